"""One-file task artifacts: exact round trips, metadata, atomic writes, and every bad file refused
with a message that says what is wrong, leaving the model exactly as it was."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file
from tinymodels import tiny_inputs, tiny_model

import adapterkit
from adapterkit import AdapterConfig, AdapterModel, ArtifactError, BaseModelMismatch, read_metadata
from adapterkit.artifact import METADATA_KEY, read_artifact


@pytest.fixture
def trained(tmp_path):
    model = AdapterModel(tiny_model("bert", seed=0))
    model.add_adapter("sent", AdapterConfig("houlsby", bottleneck_size=6), head="classification", labels=["neg", "pos"])
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = model.save_adapter("sent", tmp_path / "sent.safetensors", metrics={"acc": 0.9}, description="demo")
    return model, path


def _fresh(seed: int = 0) -> AdapterModel:
    return AdapterModel(tiny_model("bert", seed=seed))


def test_round_trip_is_exact_and_metadata_complete(trained):
    model, path = trained
    meta = read_metadata(path)
    assert meta["name"] == "sent" and meta["library_version"] == adapterkit.__version__
    assert meta["config"]["kind"] == "houlsby" and meta["config"]["bottleneck_size"] == 6
    assert meta["task"] == {"type": "classification", "labels": ["neg", "pos"]}
    assert meta["head"] == {"type": "classification", "num_labels": 2, "dropout": 0.1}
    assert meta["base"]["model_type"] == "bert" and meta["base"]["hidden_size"] == 32
    assert meta["base"]["num_layers"] == 2 and meta["base"]["id"].startswith("bert-32x2-")
    assert meta["metrics"] == {"acc": 0.9} and meta["description"] == "demo"
    other = _fresh()
    assert other.load_adapter(path) == "sent"
    for (n1, p1), (n2, p2) in zip(model.adapters["sent"].state_dict().items(), other.adapters["sent"].state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(model(**inputs, adapter_names="sent").logits, other(**inputs, adapter_names="sent").logits)
    names = set(read_artifact(path).tensors)
    assert "layers.0.attn.down.weight" in names and "layers.1.norms.1.scale" in names and "head.out.weight" in names
    assert not any(n.startswith("base") for n in names)  # only the task's own tensors


def test_load_under_another_name_and_name_taken(trained):
    model, path = trained
    assert model.load_adapter(path, name="sent2") == "sent2"
    with pytest.raises(ValueError, match="an adapter named 'sent' is already loaded"):
        model.load_adapter(path)
    assert model.list_adapters() == ["sent", "sent2"]


def test_wrong_base_model_names_both_fingerprints(trained):
    _, path = trained
    other = _fresh(seed=7)  # same architecture, different weights
    with pytest.raises(BaseModelMismatch) as err:
        other.load_adapter(path)
    msg = str(err.value)
    assert "adapter was trained for base model [bert-32x2-" in msg and "but this model is [bert-32x2-" in msg
    assert err.value.expected["id"] != err.value.found["id"]
    assert other.list_adapters() == []
    bigger = AdapterModel(tiny_model("roberta"))
    with pytest.raises(BaseModelMismatch, match="model_type=bert.*model_type=roberta|model_type=roberta.*model_type=bert"):
        bigger.load_adapter(path)


def test_fingerprint_survives_dtype_changes(trained):
    _, path = trained
    for dtype in (torch.bfloat16, torch.float16):
        half = AdapterModel(tiny_model("bert", seed=0, dtype=dtype))
        assert half.load_adapter(path) == "sent"
        assert next(half.adapters["sent"].parameters()).dtype == dtype


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(trained, keep):
    model, path = trained
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ArtifactError, match="truncated or corrupt safetensors file|not a readable safetensors file"):
        model.load_adapter(path, name="x")
    assert model.list_adapters() == ["sent"]


def test_corrupt_header_and_not_safetensors(tmp_path, trained):
    model, path = trained
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(ArtifactError, match="junk.safetensors: truncated or corrupt"):
        model.load_adapter(junk)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 20] = b"{" * 20  # break the JSON header
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="bad.safetensors"):
        model.load_adapter(bad, name="y")
    assert model.list_adapters() == ["sent"]


def test_nan_weights_refused(tmp_path, trained):
    model, path = trained
    art = read_artifact(path)
    tensors = dict(art.tensors)
    tensors["layers.0.ffn.up.weight"] = torch.full_like(tensors["layers.0.ffn.up.weight"], float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata={METADATA_KEY: json.dumps(art.metadata)})
    with pytest.raises(ArtifactError, match="tensor 'layers.0.ffn.up.weight' holds NaN or infinite values"):
        model.load_adapter(tmp_path / "nan.safetensors", name="n")


@pytest.mark.parametrize("kind", ["houlsby", "lora", "ia3", "prefix"])
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda t: torch.full(t.shape, 1e300, dtype=torch.float64), "not finite in the adapter's torch.float32"),
        (lambda t: torch.ones(t.shape, dtype=torch.int64), "is I64; an artifact holds floating-point tensors only"),
        (lambda t: torch.ones(t.shape, dtype=torch.bool), "is BOOL"),
    ],
)
def test_tensors_are_floats_finite_in_the_adapters_dtype(tmp_path, kind, bad, message):
    """A float64 1e300 is finite in the file and infinite once cast to the adapter's float32; an
    integer tensor is no adapter parameter. Both are refused, the model left as it was."""
    model = _fresh()
    model.add_adapter("a", AdapterConfig(kind))
    path = model.save_adapter("a", tmp_path / "a.safetensors")
    art = read_artifact(path)
    tensors = dict(art.tensors)
    key = sorted(tensors)[0]
    tensors[key] = bad(tensors[key])
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={METADATA_KEY: json.dumps(art.metadata)})
    with pytest.raises(ArtifactError, match=message):
        model.load_adapter(tmp_path / "bad.safetensors", name="b")
    assert model.list_adapters() == ["a"]


def _rewrite(tmp_path, path, name, tensors=None, metadata=None, raw_meta=None):
    art = read_artifact(path)
    out = tmp_path / name
    meta = raw_meta if raw_meta is not None else {METADATA_KEY: json.dumps(metadata if metadata is not None else art.metadata)}
    save_file(tensors if tensors is not None else dict(art.tensors), str(out), metadata=meta)
    return out


def test_missing_and_malformed_metadata(tmp_path, trained):
    model, path = trained
    meta = read_artifact(path).metadata
    cases = {
        "nometa.safetensors": (dict(raw_meta={"format": "pt"}), "no adapterkit metadata in the safetensors header"),
        "notjson.safetensors": (dict(raw_meta={METADATA_KEY: "{not json"}), "adapterkit metadata is not valid JSON"),
        "list.safetensors": (dict(raw_meta={METADATA_KEY: "[1, 2]"}), "metadata must be a JSON object, got list"),
        "nobase.safetensors": (dict(metadata={k: v for k, v in meta.items() if k != "base"}), "metadata lacks required key\\(s\\) base"),
        "format.safetensors": (dict(metadata={**meta, "format": "other"}), "metadata format is 'other'"),
        "future.safetensors": (dict(metadata={**meta, "format_version": 99}), "format_version 99 is not supported"),
        "labels.safetensors": (dict(metadata={**meta, "task": {"type": "classification", "labels": "neg,pos"}}), "'task.labels' must be a list of strings"),
        "config.safetensors": (dict(metadata={**meta, "config": {**meta["config"], "kind": "no-such-kind"}}), "bad adapter config in metadata: AdapterConfig.kind must be one of"),
        "headcount.safetensors": (dict(metadata={**meta, "task": {"type": "classification", "labels": ["a", "b", "c"]}}), "head has 2 outputs but task lists 3 labels"),
    }
    for filename, (kwargs, message) in cases.items():
        bad = _rewrite(tmp_path, path, filename, **kwargs)
        with pytest.raises(ArtifactError, match=message):
            model.load_adapter(bad, name="z")
    assert model.list_adapters() == ["sent"]


def test_shape_and_name_mismatches(tmp_path, trained):
    model, path = trained
    tensors = dict(read_artifact(path).tensors)
    wide = dict(tensors, **{"layers.0.attn.down.weight": torch.zeros(9, 32)})
    with pytest.raises(ArtifactError, match=r"tensor shapes do not match: layers.0.attn.down.weight: file \(9, 32\) vs model \(6, 32\)"):
        model.load_adapter(_rewrite(tmp_path, path, "wide.safetensors", tensors=wide), name="w")
    missing = {k: v for k, v in tensors.items() if k != "head.out.bias"}
    with pytest.raises(ArtifactError, match=r"missing: \['head.out.bias'\]"):
        model.load_adapter(_rewrite(tmp_path, path, "missing.safetensors", tensors=missing), name="m")
    extra = dict(tensors, **{"layers.0.lora_A": torch.zeros(2)})
    with pytest.raises(ArtifactError, match=r"unexpected: \['layers.0.lora_A'\]"):
        model.load_adapter(_rewrite(tmp_path, path, "extra.safetensors", tensors=extra), name="e")
    assert model.list_adapters() == ["sent"]
    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "nope.safetensors")


def test_atomic_write_keeps_the_old_file_on_a_crash(trained, monkeypatch):
    model, path = trained
    before = path.read_bytes()
    with torch.no_grad():
        for p in model.adapters["sent"].parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk died during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        model.save_adapter("sent", path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old artifact, intact
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    model.save_adapter("sent", path)
    assert path.read_bytes() != before


def test_no_pickle_in_the_package():
    import pathlib

    src = pathlib.Path(adapterkit.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        # the one exception the issue allows: foreign ``.bin`` files, read with weights_only=True
        lines = [ln for ln in text.splitlines() if not ("torch.load(" in ln and "weights_only=True" in ln)]
        for needle in ("import pickle", "torch.load(", "pickle.load"):
            assert needle not in "\n".join(lines), f"{f}: {needle}"
