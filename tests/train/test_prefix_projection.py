"""Training a prefix through its reparameterisation MLP (``prefix_projection``) with ``fit`` and
``adapterkit train``: checkpoints keep the MLP (a killed run resumes exactly), the artifact holds the
folded plain prefixes, and afterwards the model holds the best epoch's prefixes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupt_at_step, make_sentiment, write_jsonl
from transformers import AutoModel, AutoTokenizer

from adapterkit import AdapterConfig, AdapterModel, read_metadata
from adapterkit.artifact import read_artifact
from adapterkit.cli import main
from adapterkit.data import load_task
from adapterkit.train import TrainConfig, TrainingInterrupted, fit, run_paths

MLP = AdapterConfig("prefix", bottleneck_size=4, prefix_projection=True, prefix_hidden_size=16)


@pytest.fixture
def sentiment(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", make_sentiment(96, 0)), write_jsonl(tmp_path / "val.jsonl", make_sentiment(32, 1))


def _run(folder, train, val, tokenizer, out, resume=False):
    model = AdapterModel(AutoModel.from_pretrained(folder))
    torch.manual_seed(0)
    model.add_adapter("s", MLP, head="classification", labels=train.labels)
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=16, progress=False, checkpoint_steps=2)
    return model, fit(model, "s", train, val, tokenizer, out, config, resume=resume)


def test_checkpoints_keep_the_mlp_and_resume_exactly(tmp_path, tiny_bert, sentiment, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    model, reference = _run(tiny_bert, train, val, tokenizer, tmp_path / "a" / "s.safetensors")
    artifact = read_artifact(reference.artifact)
    expected = artifact.tensors
    prefix_names = {k for k in expected if k.startswith("layers.")}
    assert prefix_names == {f"layers.{i}.prefix.{w}" for i in range(2) for w in ("key", "value")}
    assert "prefix_projection" not in artifact.metadata["config"]
    assert artifact.metadata["trained_with"] == {"prefix_projection": True, "prefix_hidden_size": 16}
    # afterwards the model holds the best epoch's prefixes, folded (as the artifact)
    adapter = model.adapters["s"]
    assert not adapter.config.prefix_projection and MLP.prefix_projection
    assert all(torch.equal(v, expected[k]) for k, v in adapter.state_dict().items())

    out = tmp_path / "b" / "s.safetensors"
    interrupt_at_step(monkeypatch, 5)  # SIGTERM lands during the 5th optimizer step (first epoch has 6)
    with pytest.raises(TrainingInterrupted, match="stopped at step 5"):
        _run(tiny_bert, train, val, tokenizer, out)
    monkeypatch.undo()
    folder = run_paths(out)["checkpoint"]
    step = folder / json.loads((folder / "latest.json").read_text())["dir"]
    checkpoint = read_artifact(step / "adapter.safetensors")
    assert checkpoint.metadata["config"]["prefix_projection"] is True  # the MLP, as it trains
    assert {k for k in checkpoint.tensors if k.startswith("layers.")} == {
        "layers.0.prefix.embedding", "layers.0.prefix.down.weight", "layers.0.prefix.down.bias",
        *(f"layers.{i}.prefix.up.{w}" for i in range(2) for w in ("weight", "bias"))}
    _, resumed = _run(tiny_bert, train, val, tokenizer, out, resume=True)
    got = read_artifact(out).tensors
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in reference.history]


def test_cli_prefix_projection(tmp_path, tiny_bert, sentiment, capsys):
    common = ["--base", str(tiny_bert), "--data", str(sentiment[0]), "--validation", str(sentiment[1]), "--epochs", "1",
              "--batch-size", "32", "--no-progress", "--threads", "1"]
    out = tmp_path / "p.safetensors"
    assert main(["train", *common, "--task", "p", "--out", str(out), "--kind", "prefix", "--bottleneck-size", "4",
                 "--prefix-projection", "--prefix-hidden-size", "8"]) == 0
    meta = read_metadata(out)
    assert (meta["config"]["kind"], meta["config"]["bottleneck_size"]) == ("prefix", 4)
    assert "prefix_projection" not in meta["config"]
    assert meta["trained_with"] == {"prefix_projection": True, "prefix_hidden_size": 8}
    assert {k.rsplit(".", 1)[1] for k in read_artifact(out).tensors if k.startswith("layers.")} == {"key", "value"}
    capsys.readouterr()
    for extra, error in ((["--kind", "lora", "--prefix-projection"], "--prefix-projection need --kind prefix (got --kind lora)"),
                         (["--prefix-hidden-size", "8"], "--prefix-hidden-size need --kind prefix (got --kind houlsby)"),
                         (["--full", "--prefix-projection"], "--full trains the whole model, not an adapter: "
                                                             "--prefix-projection would be ignored")):
        code = main(["train", *common, "--task", "x", "--out", str(tmp_path / "x.safetensors"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"adapterkit train: error: {error}"), err
