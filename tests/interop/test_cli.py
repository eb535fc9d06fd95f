"""``adapterkit convert`` / ``adapterkit export`` through the real command line (``adapterkit.cli.main``),
on folders made by the real PEFT and adapters libraries; ``hf:`` references from an offline Hugging Face
cache; the README.md card ``export`` writes. Outputs are compared in eval mode within 1e-5."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tinymodels import TINY, tiny_inputs

from adapterkit import AdapterModel
from adapterkit.artifact import read_metadata
from adapterkit.cli import main
from adapterkit.interop import InteropError

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoConfig, BertForSequenceClassification, BertModel  # noqa: E402

TOL = 1e-5
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random BERT with a 3-way classifier on disk: bare (``BertModel``) it is the backbone alone."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertForSequenceClassification(AutoConfig.for_model("bert", **TINY["bert"][0], num_labels=3)).save_pretrained(path)
    return path


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random adapter (and head) weights, so that every mapped tensor matters to the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name or "modules_to_save" in name or ".adapters." in name or name.startswith("heads."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


@pytest.fixture(scope="module")
def peft_lora(base_dir, tmp_path_factory):
    """A PEFT LoRA folder (no head) saved by real PEFT, and the PEFT model's outputs."""
    folder = tmp_path_factory.mktemp("src") / "my-lora"
    peft_model = get_peft_model(BertModel.from_pretrained(base_dir), LoraConfig(
        target_modules=["query", "value", "intermediate.dense"], r=4, lora_alpha=8, init_lora_weights=False)).eval()
    _randomize(peft_model)
    peft_model.save_pretrained(folder)
    with torch.no_grad():
        expected = _out(peft_model(**tiny_inputs("bert")))
    return folder, expected


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _assert_no_local_paths(folder, *paths) -> None:
    """No file ``export`` wrote (configs, weights' headers, the card) holds any of ``paths``."""
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert files
    for f in files:
        data = f.read_bytes()
        for path in paths:
            assert str(path).encode() not in data, f"{f.name} holds the local path {path}"


def _ours(base_dir, artifact) -> torch.Tensor:
    model = AdapterModel(BertModel.from_pretrained(base_dir)).eval()
    name = model.load_adapter(artifact)
    with torch.no_grad():
        return _out(model(**tiny_inputs("bert"), adapter_names=name))


def test_convert_peft_lora_then_export_to_peft(tmp_path, base_dir, peft_lora):
    folder, expected = peft_lora
    artifact = tmp_path / "task.safetensors"
    assert _cli("convert", folder, "--base", base_dir, "--out", artifact) == 0
    meta = read_metadata(artifact)
    assert meta["name"] == "task"  # PEFT saves no name: the --out file's stem
    assert meta["source"]["format"] == "peft" and meta["source"]["peft_type"] == "LORA"
    assert meta["source"]["version"] == json.loads((folder / "adapter_config.json").read_text())["peft_version"]
    assert meta["source"]["source"] == "my-lora"  # the folder's base name
    assert meta["source"]["base_folder"] == base_dir.name
    text = json.dumps(meta)
    assert str(folder.parent) not in text and str(base_dir) not in text  # no local path recorded
    torch.testing.assert_close(_ours(base_dir, artifact), expected, atol=TOL, rtol=0)

    out = tmp_path / "exported"
    assert _cli("export", artifact, "--base", base_dir, "--to", "peft", "--out", out) == 0
    # only a local folder is known for the base: the config names none (PEFT loads it so), and no
    # exported file holds a local path
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    _assert_no_local_paths(out, tmp_path, base_dir)
    again = PeftModel.from_pretrained(BertModel.from_pretrained(base_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again(**tiny_inputs("bert"))), expected, atol=TOL, rtol=0)
    # the card: a local base is not named by its path, but by its base name and fingerprint
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(base_dir) not in card
    assert "unknown" in card and base_dir.name in card and meta["base"]["id"] in card
    assert "PeftModel.from_pretrained" in card and "library_name: peft" in card
    assert '"kind": "lora"' in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "task.safetensors"]  # no staging left


def test_peft_classifier_card_names_the_portable_base(tmp_path, base_dir):
    """A SEQ_CLS LoRA with its head; the base id given at export (a Hub id) is what the card names."""
    peft_model = get_peft_model(BertForSequenceClassification.from_pretrained(base_dir), LoraConfig(
        task_type="SEQ_CLS", target_modules=["query", "value"], r=4, init_lora_weights=False)).eval()
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "cls")
    with torch.no_grad():
        expected = _out(peft_model(**tiny_inputs("bert")))
    artifact = tmp_path / "sentiment.safetensors"
    assert _cli("convert", tmp_path / "cls", "--base", base_dir, "--out", artifact, "--labels", "neg,neu,pos") == 0
    torch.testing.assert_close(_ours(base_dir, artifact), expected, atol=TOL, rtol=0)
    # metrics, as a trained artifact has them: re-saved through the library's own save_adapter
    model = AdapterModel(BertModel.from_pretrained(base_dir))
    model.load_adapter(artifact)
    model.base.config._name_or_path = "acme/tiny-bert"  # as if loaded from the Hub under that id
    model.save_adapter("sentiment", artifact, metrics={"accuracy": 0.875})
    out = tmp_path / "card"
    assert _cli("export", artifact, "--base", base_dir, "--to", "peft", "--out", out) == 0
    card = (out / "README.md").read_text()
    assert "base_model: acme/tiny-bert" in card and 'AutoModelForSequenceClassification.from_pretrained("acme/tiny-bert"' in card
    assert "`neg`, `neu`, `pos`" in card and "| accuracy | 0.875 |" in card
    assert str(tmp_path) not in card
    # the exported config names the portable base, not a local path
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-bert"
    _assert_no_local_paths(out, tmp_path, base_dir)
    again = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again(**tiny_inputs("bert"))), expected, atol=TOL, rtol=0)


def test_adapters_library_convert_and_export(tmp_path, base_dir):
    adapters = pytest.importorskip("adapters")  # installed in the transformers 4.57 environment only
    source = adapters.AutoAdapterModel.from_pretrained(base_dir)
    source.add_adapter("topic", config=adapters.DoubleSeqBnConfig(reduction_factor=8))
    source.add_classification_head("topic", num_labels=3)
    _randomize(source)
    source.set_active_adapters("topic")
    source.eval()
    with torch.no_grad():
        expected = _out(source(**tiny_inputs("bert")))
    source.save_adapter(str(tmp_path / "src"), "topic")
    artifact = tmp_path / "a.safetensors"
    assert _cli("convert", tmp_path / "src", "--base", base_dir, "--out", artifact) == 0
    meta = read_metadata(artifact)
    assert meta["name"] == "topic" and meta["config"]["kind"] == "houlsby"
    assert meta["source"]["format"] == "adapters" and meta["source"]["version"] == "adapters." + adapters.__version__
    torch.testing.assert_close(_ours(base_dir, artifact), expected, atol=TOL, rtol=0)
    out = tmp_path / "back"
    assert _cli("export", artifact, "--base", base_dir, "--to", "adapters", "--out", out) == 0
    # a local base only: model_name is null in both configs (the library loads it so), no local path anywhere
    for config in ("adapter_config.json", "head_config.json"):
        assert json.loads((out / config).read_text())["model_name"] is None
    _assert_no_local_paths(out, tmp_path, base_dir)
    again = adapters.AutoAdapterModel.from_pretrained(base_dir)
    again.set_active_adapters(again.load_adapter(str(out), use_safetensors=True))
    with torch.no_grad():
        torch.testing.assert_close(_out(again.eval()(**tiny_inputs("bert"))), expected, atol=TOL, rtol=0)
    card = (out / "README.md").read_text()
    assert "AutoAdapterModel" in card and "library_name: adapter-transformers" in card and str(tmp_path) not in card


def test_hub_push_of_a_folder_converts_as_convert_does(tmp_path, base_dir, peft_lora):
    """``adapterkit hub push FOLDER`` runs convert's own code: the same tensors, the same ``source``."""
    pytest.importorskip("adapterkit.hub.registry")
    from safetensors.torch import load_file

    from adapterkit.hub.registry import LocalRegistry

    folder, expected = peft_lora
    converted = tmp_path / "lora.safetensors"
    assert _cli("convert", folder, "--base", base_dir, "--out", converted) == 0
    root = tmp_path / "reg"
    assert _cli("hub", "push", folder, "team/lora", "--base", base_dir, "--registry", root) == 0
    pushed = LocalRegistry(root).download("team/lora")
    mine, theirs = read_metadata(converted), read_metadata(pushed)
    assert theirs["source"] == mine["source"] and theirs["source"]["format"] == "peft"
    assert theirs["base"] == mine["base"] and theirs["name"] == mine["name"] == "lora"
    a, b = load_file(converted), load_file(pushed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(_ours(base_dir, pushed), expected, atol=TOL, rtol=0)


# -- bad inputs: a clear error, exit status 2, nothing written -------------------------------------


def _bad_folders(tmp_path, peft_lora):
    (tmp_path / "file.json").write_text("{}")
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text('{"something": "else"}')
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}')
    save_file({"prompt_embeddings": torch.zeros(4, 32)}, str(prefix / "adapter_model.safetensors"))
    dora = tmp_path / "dora"  # use_dora claimed, but no magnitude tensors in the weights
    shutil.copytree(peft_lora[0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return {"missing": (tmp_path / "nope", "no such folder"), "file": (tmp_path / "file.json", "not a folder"),
            "unknown": (other, "not a PEFT or adapters-library folder"), "prefix": (prefix, "PREFIX_TUNING"),
            "dora": (dora, "lora_magnitude_vector")}


@pytest.mark.parametrize("case", ["missing", "file", "unknown", "prefix", "dora"])
def test_convert_refuses_bad_sources(tmp_path, base_dir, peft_lora, capsys, case):
    source, message = _bad_folders(tmp_path, peft_lora)[case]
    out = tmp_path / "out" / "task.safetensors"
    assert _cli("convert", source, "--base", base_dir, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading report
    assert err.startswith("adapterkit convert: error: ") and message in err
    assert not (tmp_path / "out").exists()  # checked before anything is written: not even the folder


@pytest.fixture(scope="module")
def lora_artifact(base_dir, peft_lora, tmp_path_factory):
    artifact = tmp_path_factory.mktemp("art") / "task.safetensors"
    assert _cli("convert", peft_lora[0], "--base", base_dir, "--out", artifact) == 0
    return artifact


@pytest.mark.parametrize("case,message", [
    ("bogus", "--to must be one of peft, adapters; got 'bogus'"),
    ("missing", "no such artifact file"),
    ("not_artifact", "no adapterkit metadata"),
    ("lora_to_adapters", "of kind 'lora'"),  # refused by the writer, after the staging folder was made
    ("occupied", "is not an empty folder"),
])
def test_export_refuses_bad_inputs(tmp_path, base_dir, lora_artifact, capsys, case, message):
    artifact, to, out = lora_artifact, "peft", tmp_path / "dir"
    if case == "bogus":
        to = "bogus"
    elif case == "missing":
        artifact = tmp_path / "none.safetensors"
    elif case == "not_artifact":
        artifact = tmp_path / "plain.safetensors"
        save_file({"x": torch.zeros(2)}, str(artifact))
    elif case == "lora_to_adapters":
        to = "adapters"
    elif case == "occupied":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _cli("export", artifact, "--base", base_dir, "--to", to, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading report
    assert err.startswith("adapterkit export: error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no staging left behind
    if case == "occupied":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


# -- hf: references from an offline Hugging Face cache -------------------------------------------


@pytest.fixture
def offline_hf_cache(tmp_path, monkeypatch):
    """A private, offline Hugging Face cache: ``HF_HOME`` / ``HF_HUB_CACHE`` under tmp_path and
    ``HF_HUB_OFFLINE=1``. huggingface_hub reads these once, when ``constants`` is imported, so that
    module is re-read with them (and again, restored, afterwards)."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    importlib.reload(constants)
    assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE == str(home / "hub")
    yield home / "hub"
    monkeypatch.undo()
    importlib.reload(constants)


def _cache_repo(cache, repo: str, folder, commit: str = COMMIT) -> None:
    """``folder``'s files as huggingface_hub caches a model repository: the file bytes in
    ``blobs/<hash>``, ``snapshots/<commit>/<file>`` linking to them, and ``refs/main`` naming the commit."""
    import hashlib

    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob.name}")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)


def test_hf_references_load_from_the_offline_cache(tmp_path, base_dir, peft_lora, offline_hf_cache):
    folder, expected = peft_lora
    _cache_repo(offline_hf_cache, "acme/tiny-lora", folder)
    model = AdapterModel(BertModel.from_pretrained(base_dir)).eval()
    model.load_adapter(folder, name="local")
    assert model.load_adapter("hf:acme/tiny-lora", name="main") == "main"
    assert model.load_adapter(f"hf:acme/tiny-lora@{COMMIT}", name="pinned") == "pinned"
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        local = _out(model(**inputs, adapter_names="local"))
        for name in ("main", "pinned"):
            torch.testing.assert_close(_out(model(**inputs, adapter_names=name)), local, atol=0, rtol=0)
    torch.testing.assert_close(local, expected, atol=TOL, rtol=0)
    # a repository the cache lacks, offline: a clear error, and the model is unchanged
    with pytest.raises(InteropError, match="hf:acme/missing: cannot get it from the Hugging Face Hub or its cache"):
        model.load_adapter("hf:acme/missing")
    with pytest.raises(InteropError, match="cannot get it"):
        model.load_adapter("hf:acme/tiny-lora@" + "f" * 40)  # a commit that is not cached
    assert model.list_adapters() == ["local", "main", "pinned"]
    # convert records the reference and the commit, not the cache's local path
    artifact = tmp_path / "from-hf.safetensors"
    assert _cli("convert", "hf:acme/tiny-lora", "--base", base_dir, "--out", artifact) == 0
    source = read_metadata(artifact)["source"]
    assert source["source"] == "hf:acme/tiny-lora" and source["commit"] == COMMIT
    assert str(tmp_path) not in json.dumps(read_metadata(artifact))
    torch.testing.assert_close(_ours(base_dir, artifact), expected, atol=TOL, rtol=0)
    assert _cli("convert", "hf:acme/missing", "--base", base_dir, "--out", tmp_path / "x.safetensors") == 2
    assert not (tmp_path / "x.safetensors").exists()
