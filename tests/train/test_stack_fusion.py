"""Training on top of frozen adapters: `adapterkit train --stack-under` (Stack(*under, task) in every step
and evaluation, recorded in the artifact by name and sha256) and `adapterkit train-fusion` (AdapterFusion
over frozen members, trained with the same loop)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_sentiment, write_jsonl
from transformers import AutoModel, AutoTokenizer

from adapterkit import AdapterConfig, AdapterModel, Fuse, Stack, read_metadata
from adapterkit.cli import main
from adapterkit.data import EncodedTask, load_task
from adapterkit.fusion import member_digest, read_fusion_header
from adapterkit.model import check_stacked_on
from adapterkit.training import TrainConfig, evaluate, fit, run_paths
from adapterkit.training.loop import training_route


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "train.jsonl", make_sentiment(96, 0)), write_jsonl(folder / "val.jsonl", make_sentiment(32, 1))


def _random_adapter(folder, name, seed, path, kind="houlsby", **config):
    """An adapter whose weights are far from the identity (a fresh one is near it, so stacking on it would
    change nothing), saved to ``path``; returns its site-tensor digest."""
    model = AdapterModel(AutoModel.from_pretrained(folder))
    model.add_adapter(name, AdapterConfig(kind, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_adapter(name, path)
    return member_digest(model.adapters[name])


def _train_argv(base, data, out, task, *extra):
    return ["train", "--base", str(base), "--data", str(data[0]), "--validation", str(data[1]), "--task", task,
            "--out", str(out), "--batch-size", "16", "--max-length", "32", "--threads", "1", "--no-progress",
            "--epochs", "3", "--lr", "1e-2", *extra]


def test_train_stacked_on_a_domain_adapter_records_it_and_reproduces_its_val_metric(tmp_path, tiny_bert, data):
    domain_path = tmp_path / "domain.safetensors"
    digest = _random_adapter(tiny_bert, "domain", 1, domain_path)
    out = tmp_path / "runs" / "s.safetensors"
    assert main(_train_argv(tiny_bert, data, out, "s", "--stack-under", str(domain_path))) == 0

    meta = read_metadata(out)
    assert meta["stacked_on"] == [{"name": "domain", "sha256": digest, "kind": "houlsby"}]
    assert str(tmp_path) not in json.dumps(meta)  # names and digests, never a local path
    log = [json.loads(line) for line in run_paths(out)["log"].read_text().splitlines()]
    best = next(r for r in reversed(log) if r["best"])
    assert meta["metrics"]["val_accuracy"] == best["val_accuracy"]

    # load_adapter records what it expects under it, and loads nothing more by itself
    alone = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    alone.load_adapter(out)
    assert alone.list_adapters() == ["s"]
    assert alone.adapter_info("s")["stacked_on"] == meta["stacked_on"]
    with pytest.raises(ValueError, match="'domain' is not loaded"):
        check_stacked_on(alone, "s")

    # the logged val metric is that of Stack(domain, s) after loading both
    model = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    model.load_adapter(domain_path)
    model.load_adapter(out)
    route = check_stacked_on(model, "s")
    assert route == Stack("domain", "s")
    val = EncodedTask(load_task(data[1]), AutoTokenizer.from_pretrained(tiny_bert), 32)
    scores = evaluate(model, route, val)
    assert scores["accuracy"] == best["val_accuracy"]
    assert abs(scores["loss"] - best["val_loss"]) < 1e-5
    # ... and the domain adapter matters: s alone answers otherwise
    batch = val.collate([val[i] for i in range(8)])
    batch.pop("labels")
    with torch.no_grad():
        stacked, plain = (model(**batch, adapter_names=r).logits for r in (route, "s"))
    assert (stacked - plain).abs().max() > 1e-3

    # a changed domain adapter is caught by its digest
    changed = tmp_path / "domain2.safetensors"
    assert _random_adapter(tiny_bert, "domain", 2, changed) != digest
    other = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    other.load_adapter(changed)
    other.load_adapter(out)
    with pytest.raises(ValueError, match="another 'domain' than the one loaded"):
        check_stacked_on(other, "s")
    # re-saving the loaded task keeps the record of what it was trained on
    other.save_adapter("s", tmp_path / "again.safetensors")
    assert read_metadata(tmp_path / "again.safetensors")["stacked_on"] == meta["stacked_on"]


def test_stacked_training_keeps_the_under_adapters_frozen_and_plain_runs_unchanged(tmp_path, tiny_bert, data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(data[0]), load_task(data[1])
    model = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    _random_adapter(tiny_bert, "domain", 3, tmp_path / "d.safetensors")
    model.load_adapter(tmp_path / "d.safetensors")
    before = {k: v.clone() for k, v in model.adapters["domain"].state_dict().items()}
    model.add_adapter("s", AdapterConfig("pfeiffer"), head="classification", labels=train.labels)
    cfg = TrainConfig(epochs=1, batch_size=16, max_length=32, progress=False, checkpoint_steps=2)
    fit(model, "s", train, val, tokenizer, tmp_path / "s.safetensors", cfg, route=Stack("domain", "s"))
    after = model.adapters["domain"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert read_metadata(tmp_path / "s.safetensors")["stacked_on"][0]["name"] == "domain"
    # a plain run writes no stacked_on at all
    model.add_adapter("t", AdapterConfig("pfeiffer"), head="classification", labels=train.labels)
    fit(model, "t", train, val, tokenizer, tmp_path / "t.safetensors", cfg)
    assert "stacked_on" not in read_metadata(tmp_path / "t.safetensors")
    assert model.adapter_info("t")["stacked_on"] == []
    # routes that do not hold the trained adapter, or are not routes at all, are refused
    with pytest.raises(ValueError, match="does not hold 't'"):
        training_route(model, "t", Stack("domain", "s"))
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        training_route(model, "t", Stack("nope", "t"))


def test_stack_under_refusals(tmp_path, tiny_bert, data):
    domain_path = tmp_path / "s.safetensors"
    _random_adapter(tiny_bert, "s", 4, domain_path)
    # the new task's name is the under-adapter's
    assert main(_train_argv(tiny_bert, data, tmp_path / "x.safetensors", "s", "--stack-under", str(domain_path))) == 2
    assert main(_train_argv(tiny_bert, data, tmp_path / "y.safetensors", "y", "--stack-under", str(domain_path),
                            "--full")) == 2
    assert main(_train_argv(tiny_bert, data, tmp_path / "z.safetensors", "z",
                            "--stack-under", str(tmp_path / "missing.safetensors"))) == 2
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_train_fusion_of_two_frozen_adapters_end_to_end(tmp_path, tiny_bert, data):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    digests = {"a": _random_adapter(tiny_bert, "a", 5, a, train_layer_norms=False),
               "b": _random_adapter(tiny_bert, "b", 6, b, kind="lora")}
    out = tmp_path / "runs" / "f.safetensors"
    assert main(_train_argv(tiny_bert, data, out, "f", "--fusion-of", str(a), str(b))) == 0

    _, doc = read_fusion_header(out)
    assert doc["format"] == "adapterkit.fusion" and doc["name"] == "f"
    assert {m["name"]: m["sha256"] for m in doc["members"]} == digests  # the members stayed frozen
    assert doc["task"] == {"type": "classification", "labels": ["neg", "pos"]}
    log = [json.loads(line) for line in run_paths(out)["log"].read_text().splitlines()]
    best = next(r for r in reversed(log) if r["best"])
    assert doc["metrics"]["val_loss"] == best["val_loss"]

    model = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    model.load_adapter(a)
    model.load_adapter(b)
    model.load_fusion(out)
    fusion = model.fusions["f"]
    assert any(site.query.abs().max() > 0 for site in fusion._table.values())  # trained: W_q starts at 0
    val = EncodedTask(load_task(data[1]), AutoTokenizer.from_pretrained(tiny_bert), 32)
    scores = evaluate(model, Fuse("a", "b", fusion="f"), val)
    assert scores["accuracy"] == best["val_accuracy"]
    assert abs(scores["loss"] - best["val_loss"]) < 1e-5


def test_fusion_training_checkpoints_resume_and_refusals(tmp_path, tiny_bert, data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(data[0]), load_task(data[1])
    model = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    for name, seed in (("a", 7), ("b", 8)):
        _random_adapter(tiny_bert, name, seed, tmp_path / f"{name}.safetensors", train_layer_norms=False)
        model.load_adapter(tmp_path / f"{name}.safetensors")
    members = {n: {k: v.clone() for k, v in model.adapters[n].state_dict().items()} for n in "ab"}
    model.add_fusion("f", ["a", "b"], head="classification", labels=train.labels)
    out = tmp_path / "f.safetensors"
    cfg = TrainConfig(epochs=2, batch_size=16, max_length=32, progress=False, checkpoint_steps=2)
    result = fit(model, "f", train, val, tokenizer, out, cfg)  # route by default: Fuse("a", "b", fusion="f")
    assert all(torch.equal(members[n][k], v) for n in "ab" for k, v in model.adapters[n].state_dict().items())
    assert (run_paths(out)["checkpoint"] / "latest.json").exists()
    assert list(run_paths(out)["checkpoint"].glob("step-*/fusion.safetensors"))
    trained = {k: v.clone() for k, v in model.fusions["f"].state_dict().items()}
    # resuming the finished run reads the fusion checkpoint back, trains nothing, keeps the best weights
    with torch.no_grad():
        for p in model.fusions["f"].parameters():
            p.zero_()
    again = fit(model, "f", train, val, tokenizer, out, cfg, resume=True)
    assert again.history == result.history
    assert all(torch.equal(trained[k], v) for k, v in model.fusions["f"].state_dict().items())
    # an adapter with norm affines cannot be fused: a clear error, exit 2, nothing written
    houlsby = tmp_path / "h.safetensors"
    _random_adapter(tiny_bert, "h", 9, houlsby)
    bad = tmp_path / "bad.safetensors"
    assert main(_train_argv(tiny_bert, data, bad, "g", "--fusion-of", str(houlsby), str(tmp_path / "a.safetensors"))) == 2
    assert main(_train_argv(tiny_bert, data, bad, "g", "--fusion-of", str(tmp_path / "a.safetensors"),
                            str(tmp_path / "b.safetensors"), "--kind", "lora")) == 2
    assert not bad.exists()
