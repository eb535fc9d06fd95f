"""Publishing an AdapterFusion: its members recorded as dependencies (a reference where this registry holds
the member, else name + digest), and `pull` of a fusion fetching its members too; locally and through
the server's client. Real tiny BERT adapters and a real fusion (save_fusion), not hand-made files."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from hub_testing import Server
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from adapterkit import AdapterConfig, AdapterModel, Fuse
from adapterkit.fusion import member_digest, read_fusion_header
from adapterkit.hub import InvalidArtifact, LocalRegistry, RemoteRegistry
from adapterkit.hub.cli import main as hub_main
from adapterkit.hub.registry import pull


def _base() -> BertModel:
    torch.manual_seed(0)  # every call: the same base (the fingerprint must match)
    return BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Member adapters a (houlsby), b (lora), c (pfeiffer) with weights far from the identity, and
    fusion f over all three, each saved to a file."""
    folder = tmp_path_factory.mktemp("fusion-files")
    model = AdapterModel(_base())
    g = torch.Generator().manual_seed(1)
    for name, kind in (("a", "houlsby"), ("b", "lora"), ("c", "pfeiffer")):
        model.add_adapter(name, AdapterConfig(kind, train_layer_norms=False))
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_adapter(name, folder / f"{name}.safetensors")
    model.add_fusion("f", ["a", "b", "c"], head="classification", labels=["neg", "pos"])
    with torch.no_grad():
        for p in model.fusions["f"].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_fusion("f", folder / "f.safetensors")
    ids = torch.randint(0, 40, (3, 7), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids, adapter_names=Fuse("a", "b", "c", fusion="f")).logits
    torch.save({"ids": ids, "logits": logits}, folder / "expected.pt")
    return {n: folder / f"{n}.safetensors" for n in "abcf"} | {"expected": folder / "expected.pt"}


def test_publish_records_members_and_pull_fetches_them(tmp_path: Path, files: dict[str, Path],
                                                       capsys: pytest.CaptureFixture) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    registry.publish(files["a"], "team/a")
    registry.publish(files["b"], "team/b")
    registry.publish(files["a"], "zz/alpha")  # the same tensors under another name, published later
    info = registry.publish(files["f"], "team/f")
    digests = {m["name"]: m["sha256"] for m in read_fusion_header(files["f"])[1]["members"]}
    assert info.kind == "fusion" and info.task_type == "classification" and info.labels == ["neg", "pos"]
    assert info.bottleneck_size is None and info.config == {}
    # a and b by this registry's reference (a's own name preferred), c (never published) by name + digest
    assert info.dependencies == ["team/a@1", "team/b@1"]
    assert info.members == [
        {"name": "a", "sha256": digests["a"], "kind": "houlsby", "ref": "team/a@1"},
        {"name": "b", "sha256": digests["b"], "kind": "lora", "ref": "team/b@1"},
        {"name": "c", "sha256": digests["c"], "kind": "pfeiffer"},
    ]
    assert registry.info("team/f@1").members == info.members  # as stored, not only as answered
    assert [v.adapter for v in registry.search(kind="fusion")] == ["team/f"]

    pulled = pull(registry, "team/f")
    assert pulled.path.read_bytes() == files["f"].read_bytes()
    assert [(v.ref, p.read_bytes()) for v, p in pulled.members] == [
        ("team/a@1", files["a"].read_bytes()), ("team/b@1", files["b"].read_bytes())]
    assert [m["name"] for m in pulled.unresolved] == ["c"]
    # what was pulled (plus c, from where we have it) loads and computes what the saved fusion did
    model = AdapterModel(_base())
    for _, path in pulled.members:
        model.load_adapter(path)
    model.load_adapter(files["c"])
    model.load_fusion(pulled.path)
    expected = torch.load(files["expected"], weights_only=True)
    with torch.no_grad():
        got = model(input_ids=expected["ids"], adapter_names=Fuse("a", "b", "c", fusion="f")).logits
    assert torch.allclose(got, expected["logits"], atol=1e-6)
    assert member_digest(model.adapters["a"]) == digests["a"]

    # the command line: every file beside the output, the fusion first; a warning names c
    out = tmp_path / "out"
    out.mkdir()
    assert hub_main(["pull", "team/f", "--registry", str(tmp_path / "reg"), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    printed = [Path(line) for line in captured.out.split()]
    assert [p.name for p in printed] == ["team-f-1.safetensors", "team-a-1.safetensors", "team-b-1.safetensors"]
    assert printed[1].read_bytes() == files["a"].read_bytes()
    assert "fusion member c" in captured.err and "not in this registry" in captured.err
    assert hub_main(["info", "team/f", "--registry", str(tmp_path / "reg")]) == 0
    assert "a (team/a@1), b (team/b@1), c (not in this registry)" in capsys.readouterr().out
    # a plain adapter pulls as before: one path
    assert hub_main(["pull", "team/a", "--registry", str(tmp_path / "reg")]) == 0
    assert len(capsys.readouterr().out.split()) == 1


def test_a_fusion_whose_tensors_lie_is_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    doc = read_fusion_header(files["f"])[1]
    tensors = load_file(str(files["f"]))

    def write(name: str, t: dict[str, torch.Tensor], d: dict = doc) -> Path:
        path = tmp_path / name
        save_file(t, str(path), metadata={"adapterkit": json.dumps(d)})
        return path

    wrong_head = {**tensors, "head.classifier.weight": torch.zeros(5, 32)}
    with pytest.raises(InvalidArtifact, match="head's tensors do not match"):
        registry.publish(write("h.safetensors", wrong_head), "team/h")
    key = next(k for k in tensors if k.endswith(".query"))
    with pytest.raises(InvalidArtifact, match="query, key and value of one shape"):
        registry.publish(write("q.safetensors", {**tensors, key: torch.zeros(4, 4)}), "team/q")
    with pytest.raises(InvalidArtifact, match="not a fusion layer"):
        registry.publish(write("n.safetensors", {**tensors, "layers.9.attn.query": torch.zeros(32, 32)}), "team/n")
    with pytest.raises(InvalidArtifact, match="members"):
        registry.publish(write("m.safetensors", tensors, {**doc, "members": doc["members"][:1]}), "team/m")
    assert registry.stats() == {"adapters": 0, "versions": 0}


def test_publish_and_pull_a_fusion_through_the_server(hub_server: Server, tmp_path: Path,
                                                      files: dict[str, Path]) -> None:
    with RemoteRegistry(hub_server.url, hub_server.tokens["alice"], cache_dir=tmp_path / "cache") as alice:
        alice.publish(files["a"], "fuse-team/a")
        alice.publish(files["b"], "fuse-team/b")
        alice.publish(files["c"], "fuse-team/c")
        info = alice.publish(files["f"], "fuse-team/f")
        assert info.dependencies == ["fuse-team/a@1", "fuse-team/b@1", "fuse-team/c@1"]
        pulled = pull(alice, "fuse-team/f@1")
        assert [p.read_bytes() for _, p in pulled.members] == [files[n].read_bytes() for n in "abc"]
        assert not pulled.unresolved
        assert all(p.is_relative_to(tmp_path / "cache") for _, p in pulled.members)
    page = httpx.get(f"{hub_server.url}/adapters/fuse-team/f")  # the web page renders a fusion too
    assert page.status_code == 200 and "fusion" in page.text
