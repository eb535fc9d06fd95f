"""The training loop: it learns, keeps the best epoch, writes its log and plot, and resumes exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import interrupt_at_step, make_sentiment, write_jsonl
from transformers import AutoModel, AutoTokenizer

import adapterkit.train as train_module
from adapterkit import AdapterConfig, AdapterModel, read_metadata
from adapterkit.artifact import read_artifact
from adapterkit.data import EncodedTask, load_task
from adapterkit.train import TrainConfig, TrainingInterrupted, evaluate, fit, run_paths


@pytest.fixture
def sentiment(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", make_sentiment(96, 0)), write_jsonl(tmp_path / "val.jsonl", make_sentiment(32, 1))


def _model(folder, labels, seed=0, kind="houlsby"):
    model = AdapterModel(AutoModel.from_pretrained(folder))
    torch.manual_seed(seed)
    model.add_adapter("s", AdapterConfig(kind), head="classification", labels=labels)
    return model


def _weights(model):
    return {k: v.detach().clone() for k, v in model.adapters["s"].state_dict().items()}


def test_minilm_adapter_learns_and_writes_artifact_log_and_plot(tmp_path, minilm, sentiment):
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    model = _model(minilm, train.labels)
    before = evaluate(model, "s", EncodedTask(val, tokenizer))["accuracy"]
    out = tmp_path / "runs" / "s.safetensors"
    result = fit(model, "s", train, val, tokenizer, out, TrainConfig(epochs=2, lr=3e-3, batch_size=16, progress=False))
    assert result.best_metric >= max(0.9, before + 0.15), (before, result.history)
    assert result.parameters.percent < 3.0
    meta = read_metadata(out)
    assert meta["task"] == {"type": "classification", "labels": ["neg", "pos"]}
    assert meta["metrics"]["val_accuracy"] == result.best_metric and meta["metrics"]["epoch"] == result.best_epoch
    paths = run_paths(out)
    log = [json.loads(line) for line in paths["log"].read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log == result.history
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the artifact alone reproduces the best validation accuracy on a fresh base model
    fresh = AdapterModel(AutoModel.from_pretrained(minilm))
    fresh.load_adapter(out)
    assert evaluate(fresh, "s", EncodedTask(val, tokenizer))["accuracy"] == result.best_metric


def test_best_epoch_is_kept_not_the_last(tmp_path, tiny_bert, sentiment, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    model = _model(tiny_bert, train.labels)
    scripted, seen = iter([0.5, 0.8, 0.6]), []

    def fake_evaluate(model, name, data, **kwargs):
        seen.append(_weights(model))
        acc = next(scripted)
        return {"accuracy": acc, "macro_f1": acc, "loss": 1 - acc}

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    out = tmp_path / "s.safetensors"
    result = fit(model, "s", train, val, tokenizer, out, TrainConfig(epochs=3, lr=1e-2, batch_size=16, progress=False))
    assert (result.best_epoch, result.best_metric) == (2, 0.8)
    assert [h["best"] for h in result.history] == [True, True, False]
    saved = read_artifact(out).tensors
    assert all(torch.equal(saved[k], seen[1][k]) for k in saved)
    assert not all(torch.equal(seen[1][k], seen[2][k]) for k in saved)
    assert all(torch.equal(v, seen[1][k]) for k, v in _weights(model).items())  # the model holds the best too
    assert read_metadata(out)["metrics"]["epoch"] == 2


def _run(folder, train, val, tokenizer, out, resume=False, **overrides):
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=16, progress=False, checkpoint_steps=2, **overrides)
    return fit(_model(folder, train.labels), "s", train, val, tokenizer, out, config, resume=resume)


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, tiny_bert, sentiment, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    reference = _run(tiny_bert, train, val, tokenizer, tmp_path / "a" / "s.safetensors")
    expected = read_artifact(reference.artifact).tensors

    out = tmp_path / "b" / "s.safetensors"
    interrupt_at_step(monkeypatch, 5)  # SIGTERM lands during the 5th optimizer step (first epoch has 6)
    with pytest.raises(TrainingInterrupted, match="stopped at step 5"):
        _run(tiny_bert, train, val, tokenizer, out)
    monkeypatch.undo()
    assert json.loads((run_paths(out)["checkpoint"] / "latest.json").read_text())["step"] == 5
    assert not out.exists()  # no evaluation yet, so no artifact: never a half-trained one
    resumed = _run(tiny_bert, train, val, tokenizer, out, resume=True)
    got = read_artifact(out).tensors
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in reference.history]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tiny_bert, sentiment):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    out = tmp_path / "s.safetensors"
    _run(tiny_bert, train, val, tokenizer, out)
    with pytest.raises(ValueError, match="checkpoint is from a different run"):
        _run(tiny_bert, train, val, tokenizer, out, resume=True, seed=1)


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import adapterkit.train as t
    from transformers import AutoModel, AutoTokenizer
    from adapterkit import AdapterConfig, AdapterModel
    from adapterkit.data import load_task
    folder, train_path, val_path, out = sys.argv[1:5]
    real_write_json, pointer_writes = t._write_json, []

    def write_json(path, doc):
        if path.name == "latest.json":
            pointer_writes.append(path)
            if len(pointer_writes) == 4:  # killed mid-checkpoint: step 4's files written, pointer not
                os.kill(os.getpid(), signal.SIGKILL)
        real_write_json(path, doc)

    t._write_json = write_json
    train, val = load_task(train_path), load_task(val_path)
    model = AdapterModel(AutoModel.from_pretrained(folder))
    torch.manual_seed(0)
    model.add_adapter("s", AdapterConfig("houlsby"), head="classification", labels=train.labels)
    config = t.TrainConfig(epochs=2, lr=1e-2, batch_size=16, progress=False, checkpoint_steps=1)
    t.fit(model, "s", train, val, AutoTokenizer.from_pretrained(folder), out, config)
    """
)


@pytest.mark.slow
def test_killed_process_resumes_from_its_last_complete_checkpoint(tmp_path, tiny_bert, sentiment):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    reference = fit(
        _model(tiny_bert, train.labels), "s", train, val, tokenizer, tmp_path / "a" / "s.safetensors",
        TrainConfig(epochs=2, lr=1e-2, batch_size=16, progress=False, checkpoint_steps=1),
    )
    out = tmp_path / "b" / "s.safetensors"
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_bert), str(sentiment[0]), str(sentiment[1]), str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoint = run_paths(out)["checkpoint"]
    assert json.loads((checkpoint / "latest.json").read_text())["step"] == 3
    resumed = fit(
        _model(tiny_bert, train.labels), "s", train, val, tokenizer, out,
        TrainConfig(epochs=2, lr=1e-2, batch_size=16, progress=False, checkpoint_steps=1), resume=True,
    )
    expected, got = read_artifact(reference.artifact).tensors, read_artifact(out).tensors
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.history == reference.history or [h["val_loss"] for h in resumed.history] == [
        h["val_loss"] for h in reference.history
    ]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["latest.json", "step-00000012"]


def test_full_fine_tuning_through_the_same_loop(tmp_path, tiny_bert, sentiment):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    model = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    torch.manual_seed(0)
    model.add_adapter("s", AdapterConfig(leave_out=[0, 1], train_layer_norms=False), head="classification", labels=train.labels)
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    out = tmp_path / "s.safetensors"
    result = fit(model, "s", train, val, tokenizer, out, TrainConfig(epochs=1, batch_size=16, full=True, progress=False))
    assert result.parameters.percent > 100  # every base parameter plus the head
    base_file = run_paths(out)["base"]
    from safetensors.torch import load_file

    saved = load_file(str(base_file))
    assert any(not torch.equal(saved[k], before[k]) for k in saved)


def _pair_rows(n: int, seed: int) -> list[dict]:
    """The label is the polarity of the *second* text; the first carries a random, unrelated one."""
    rows = make_sentiment(2 * n, seed)
    return [{"premise": a["text"], "hypothesis": b["text"], "label": b["label"]} for a, b in zip(rows[::2], rows[1::2])]


def _token_rows(n: int, seed: int) -> list[dict]:
    """Each word tagged POS / NEG / O by which list it comes from."""
    from conftest import FILLER, NEGATIVE, POSITIVE

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE), rng.choice(NEGATIVE)]
        rng.shuffle(words)
        tags = ["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in words]
        rows.append({"tokens": words, "tags": tags})
    return rows


@pytest.mark.parametrize("kind", ["pair_classification", "token_classification"])
def test_pair_and_token_tasks_learn_end_to_end(tmp_path, minilm, kind):
    rows = _pair_rows if kind == "pair_classification" else _token_rows
    train_path = write_jsonl(tmp_path / "train.jsonl", rows(192, 0))
    val_path = write_jsonl(tmp_path / "val.jsonl", rows(32, 1))
    columns = {"text_column": "premise", "text_pair_column": "hypothesis"} if kind == "pair_classification" else {}
    train = load_task(train_path, **columns)
    val = load_task(val_path, labels=train.labels, **columns)
    assert train.task_type == kind
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model = AdapterModel(AutoModel.from_pretrained(minilm))
    torch.manual_seed(0)
    model.add_adapter("t", AdapterConfig("houlsby"), head=kind, labels=train.labels)
    before = evaluate(model, "t", EncodedTask(val, tokenizer))["accuracy"]
    out = tmp_path / f"{kind}.safetensors"
    result = fit(model, "t", train, val, tokenizer, out, TrainConfig(epochs=5, lr=3e-3, batch_size=16, progress=False))
    assert result.best_metric >= max(0.85, before + 0.2), (before, result.history)
    assert read_metadata(out)["task"]["type"] == kind
    fresh = AdapterModel(AutoModel.from_pretrained(minilm))
    fresh.load_adapter(out)
    assert evaluate(fresh, "t", EncodedTask(val, tokenizer))["accuracy"] == result.best_metric


def test_stochastic_adapter_drop_samples_per_step_and_cuts_the_lower_layers(tmp_path, tiny_bert, sentiment):
    """``adapter_drop=K``: each step drops the lowest k layers' adapters, k from the seed and the step
    (so the same on every process and after a resume); a dropped layer's adapter gets no gradient."""
    from adapterkit.training.loop import dropped_layers

    config = TrainConfig(epochs=1, batch_size=16, progress=False, adapter_drop=2, seed=3)
    draws = [dropped_layers(config, step) for step in range(60)]
    assert set(draws) == {0, 1, 2}
    assert draws == [dropped_layers(config, step) for step in range(60)]
    assert dropped_layers(TrainConfig(progress=False), 5) == 0
    with pytest.raises(ValueError, match="adapter_drop"):
        TrainConfig(adapter_drop=-1)
    with pytest.raises(ValueError, match="full fine-tuning"):
        TrainConfig(adapter_drop=1, full=True)

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    model = _model(tiny_bert, train.labels)
    lowest = model.adapters["s"].site(0, "ffn").down.weight
    seen: list[tuple[int, bool]] = []  # (k of the step, did layer 0's adapter get a gradient)
    lowest.register_hook(lambda g: seen.append(("grad", True)))
    original = model.route

    def spy(names, drop_below=0):  # record each step's drop; the loop routes through model.route
        seen.append(("drop", drop_below))
        return original(names, drop_below=drop_below)

    model.route = spy
    result = fit(model, "s", train, val, tokenizer, tmp_path / "s.safetensors", config)
    assert result.best_metric >= 0
    steps = result.history[-1]["step"]
    assert 0 in draws[:steps] and any(draws[:steps])  # seed 3: both kinds of step happen
    drops = [k for tag, k in seen if tag == "drop"]
    assert drops == [k for k in draws[:steps] if k]  # a step without a drop routes as before
    # layer 0's adapter got a gradient exactly on the steps that kept it (k == 0)
    assert sum(1 for tag, _ in seen if tag == "grad") == sum(1 for k in draws[:steps] if k == 0)
    with pytest.raises(ValueError, match="adapter_drop is 9"):
        fit(_model(tiny_bert, train.labels), "s", train, val, tokenizer, tmp_path / "t.safetensors",
            TrainConfig(epochs=1, progress=False, adapter_drop=9))


_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="no CUDA device"))])
@pytest.mark.parametrize("kind", ["houlsby", "lora"])
def test_fit_on_a_device_with_a_bfloat16_base(tmp_path, tiny_bert, sentiment, device, kind):
    """``TrainConfig(device=..., dtype="bfloat16")``: the base runs in bf16 on the device, the adapter
    trains in float32 (its optimizer state too), the base stays frozen, and the saved artifact, loaded
    onto a float32 CPU base, predicts what the trained model did."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(sentiment[0]), load_task(sentiment[1])
    model = _model(tiny_bert, train.labels, kind=kind)
    out = tmp_path / "s.safetensors"
    config = TrainConfig(epochs=3, lr=1e-2, batch_size=16, progress=False, device=device, dtype="bfloat16")
    result = fit(model, "s", train, val, tokenizer, out, config)
    base = next(model.base.parameters())
    assert (base.device.type, base.dtype) == (device, torch.bfloat16)
    assert all(p.device.type == device and p.dtype == torch.float32 for p in model.adapters["s"].parameters())
    assert result.best_metric == max(h["val_accuracy"] for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"], result.history
    fresh = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    fresh.load_adapter(out)
    cpu = evaluate(fresh, "s", EncodedTask(val, tokenizer))["accuracy"]
    assert abs(cpu - result.best_metric) <= 2 / 32  # bf16 vs float32 base: at most a row or two of 32 flip
