"""LocalRegistry: publish, versions, latest, yank, delete, search, dedup, crash recovery, resolve."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from hub_testing import fingerprint, make_artifact, sha256

from adapterkit.hub import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidArtifact,
    LocalRegistry,
    NotFound,
    open_registry,
    resolve_reference,
)


def test_publish_auto_increments_and_info_reports_the_artifact(registry: LocalRegistry, tmp_path: Path) -> None:
    a = make_artifact(tmp_path / "a.safetensors", seed=1, metrics={"accuracy": 0.5})
    b = make_artifact(tmp_path / "b.safetensors", seed=2, task_type="token_classification", labels=["O", "B-X"])
    v1 = registry.publish(a, "team/sms-spam", description="first")
    v2 = registry.publish(b, "team/sms-spam", metrics={"f1": 0.75})
    assert (v1.ref, v2.ref) == ("team/sms-spam@1", "team/sms-spam@2")
    assert v1.sha256 == sha256(a) and v1.size == a.stat().st_size
    assert v1.metrics == {"accuracy": 0.5} and v2.metrics == {"f1": 0.75}  # artifact's own, unless given
    assert (v1.kind, v1.bottleneck_size, v1.task_type, v1.labels) == ("houlsby", 8, "classification", ["neg", "pos"])
    assert v1.base_id == fingerprint()["id"] and v1.model_type == "bert" and v1.name_or_path == "tiny-bert"
    assert registry.info("team/sms-spam").version == "2"
    assert registry.info("team/sms-spam@latest").version == "2"
    assert registry.info("hub:team/sms-spam@1").description == "first"
    assert [v.version for v in registry.versions("team/sms-spam")] == ["1", "2"]


def test_explicit_versions_are_immutable_and_latest_follows_numbers(registry: LocalRegistry, tmp_path: Path) -> None:
    a, b = make_artifact(tmp_path / "a.safetensors", seed=1), make_artifact(tmp_path / "b.safetensors", seed=2)
    registry.publish(a, "team/x@1.2")
    registry.publish(b, "team/x", version="1.10")
    assert registry.info("team/x").version == "1.10"
    with pytest.raises(Conflict, match="already exists"):
        registry.publish(b, "team/x@1.2")
    with pytest.raises(BadRequest, match="two versions given"):
        registry.publish(b, "team/x@3", version="4")
    assert registry.publish(b, "team/x").version == "2"  # next whole number after 1.x
    assert registry.download("team/x@1.2").read_bytes() == a.read_bytes()


def test_yank_hides_from_latest_and_search_but_exact_download_works(registry: LocalRegistry, artifact: Path, tmp_path: Path) -> None:
    registry.publish(artifact, "team/x")
    registry.publish(make_artifact(tmp_path / "b.safetensors", seed=2), "team/x")
    yanked = registry.yank("team/x@2", reason="bad labels")
    assert yanked.yanked and yanked.yank_reason == "bad labels"
    assert registry.info("team/x").version == "1"
    assert [v.ref for v in registry.search()] == ["team/x@1"]
    assert registry.download("team/x@2").is_file()
    registry.yank("team/x@1")
    assert registry.search() == []
    with pytest.raises(NotFound, match="no usable version"):
        registry.info("team/x@latest")
    with pytest.raises(BadRequest, match="exact version"):
        registry.yank("team/x")


def test_delete_keeps_the_number_and_shared_blobs(registry: LocalRegistry, artifact: Path) -> None:
    registry.publish(artifact, "team/x")
    registry.publish(artifact, "team/copy")  # same bytes: one blob
    assert len(registry.blobs.all_blobs()) == 1
    registry.delete("team/x@1")
    with pytest.raises(NotFound, match="was deleted"):
        registry.download("team/x@1")
    with pytest.raises(Conflict, match="published and deleted"):
        registry.publish(artifact, "team/x@1")
    assert registry.download("team/copy@1").read_bytes() == artifact.read_bytes()
    registry.delete("team/copy@1")
    assert registry.blobs.all_blobs() == {} and registry.check() == []


def test_search_filters(registry: LocalRegistry, tmp_path: Path) -> None:
    gpt = fingerprint("gpt2", 48, 3, seed=7, name="openai-community/gpt2")
    registry.publish(make_artifact(tmp_path / "a.safetensors", seed=1, description="SMS spam filter"), "team/sms-spam")
    registry.publish(make_artifact(tmp_path / "b.safetensors", seed=2, kind="pfeiffer", task_type="lm", labels=[], base=gpt), "lab/poems")
    registry.publish(make_artifact(tmp_path / "c.safetensors", seed=3, kind="parallel", labels=["PER", "LOC"], task_type="token_classification"), "lab/ner")
    names = lambda found: [v.adapter for v in found]  # noqa: E731
    assert names(registry.search()) == ["lab/ner", "lab/poems", "team/sms-spam"]
    assert names(registry.search("spam")) == ["team/sms-spam"]
    assert names(registry.search("SMS filter")) == ["team/sms-spam"]
    assert names(registry.search("loc")) == ["lab/ner"]  # labels are searched
    assert names(registry.search(model_type="gpt2")) == ["lab/poems"]
    assert names(registry.search(base_id=gpt["id"])) == ["lab/poems"]
    assert names(registry.search(name_or_path="gpt2")) == ["lab/poems"]  # without the organisation
    assert names(registry.search(kind="parallel")) == ["lab/ner"]
    assert names(registry.search(task_type="classification")) == ["team/sms-spam"]
    assert names(registry.search(kind="houlsby", model_type="gpt2")) == []
    assert len(registry.search(limit=2)) == 2


def test_every_kind_publishes_is_found_by_kind_and_loads_back(registry: LocalRegistry, tmp_path: Path) -> None:
    """Artifacts of every kind, as save_adapter writes them (DoRA, prefix with its reparameterisation MLP
    folded): the hub checks, indexes and serves them all alike; search by kind finds each."""
    import torch
    from tinymodels import tiny_inputs, tiny_model

    from adapterkit import AdapterConfig, AdapterModel

    configs = {"houlsby": AdapterConfig("houlsby"), "lora": AdapterConfig("lora", targets=["q", "v", "down"], dora=True),
               "ia3": AdapterConfig("ia3"), "prefix": AdapterConfig("prefix", bottleneck_size=4, prefix_projection=True,
                                                                  prefix_hidden_size=16)}
    model = AdapterModel(tiny_model("bert")).eval()
    g = torch.Generator().manual_seed(0)
    for kind, config in configs.items():
        adapter = model.add_adapter(kind, config, head="classification", labels=["neg", "pos"])
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        registry.publish(model.save_adapter(kind, tmp_path / f"{kind}.safetensors"), f"team/{kind}-task")
    for kind in configs:
        assert [v.adapter for v in registry.search(kind=kind)] == [f"team/{kind}-task"]
        assert registry.info(f"team/{kind}-task").kind == kind
    inputs = tiny_inputs("bert")
    fresh = AdapterModel(tiny_model("bert")).eval()
    with torch.no_grad():
        for kind in configs:
            fresh.load_adapter(registry.download(f"team/{kind}-task@1"), name=kind)
            torch.testing.assert_close(fresh(**inputs, adapter_names=kind).logits,
                                       model(**inputs, adapter_names=kind).logits, atol=1e-6, rtol=0)


def test_declared_base_must_match(registry: LocalRegistry, artifact: Path) -> None:
    fp = fingerprint()
    assert registry.publish(artifact, "team/a", base=fp).base_id == fp["id"]
    assert registry.publish(artifact, "team/b", base=fp["id"]).base_id == fp["id"]
    with pytest.raises(InvalidArtifact, match="does not match the declared base"):
        registry.publish(artifact, "team/c", base=fingerprint(seed=3))
    assert [v.adapter for v in registry.search()] == ["team/a", "team/b"]


def test_namespace_owner_is_the_first_publisher(registry: LocalRegistry, artifact: Path) -> None:
    registry.publish(artifact, "team/a", owner="alice")
    registry.publish(artifact, "team/b", owner="alice")
    with pytest.raises(Forbidden, match="belongs to 'alice'"):
        registry.publish(artifact, "team/c", owner="bob")
    with pytest.raises(Forbidden):
        registry.yank("team/a@1", owner="bob")
    registry.publish(artifact, "bobs/c", owner="bob")


def test_bad_files_are_refused_and_leave_nothing(registry: LocalRegistry, tmp_path: Path, artifact: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(artifact.read_bytes()[:-64])
    for bad, why in ((junk, "safetensors"), (cut, "truncated or corrupt")):
        with pytest.raises(InvalidArtifact, match=why):
            registry.publish(bad, "team/x")
    with pytest.raises(BadRequest, match="no such file"):
        registry.publish(tmp_path / "missing.safetensors", "team/x")
    assert registry.blobs.all_blobs() == {} and registry.blobs.temp_files() == [] and registry.stats()["versions"] == 0


def test_reconcile_after_a_crash(tmp_path: Path, artifact: Path) -> None:
    """Orphan blob (crash after rename, before commit), dead temp file, row whose blob vanished."""
    root = tmp_path / "reg"
    reg = LocalRegistry(root)
    kept = reg.publish(artifact, "team/kept")
    lost = reg.publish(make_artifact(tmp_path / "b.safetensors", seed=9), "team/lost")
    reg.blobs.path_for(lost.sha256).unlink()
    orphan = reg.blobs.path_for("ab" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"half of something")
    (root / "tmp" / "up-dead.part").write_bytes(b"partial upload")
    assert len(reg.check()) == 3

    reopened = LocalRegistry(root)
    assert reopened.last_reconcile == {"stale_temps": 1, "orphan_blobs": 1, "missing_blobs": 1}
    assert reopened.check() == [f"team/lost@1: blob {lost.sha256[:12]} is missing"]  # flagged, not hidden from check
    assert [v.adapter for v in reopened.search()] == ["team/kept"]
    with pytest.raises(NotFound, match="missing from the blob store"):
        reopened.download("team/lost@1")
    assert reopened.download("team/kept").read_bytes() == artifact.read_bytes() and kept.sha256 == sha256(artifact)
    # Publishing the same bytes again heals the flagged row.
    reopened.publish(tmp_path / "b.safetensors", "team/again")
    assert reopened.download("team/lost@1").is_file() and reopened.check() == []


def test_a_live_upload_survives_reconcile(registry: LocalRegistry) -> None:
    with registry.blobs.upload() as up:
        up.write(b"in flight")
        assert LocalRegistry(registry.root).last_reconcile["stale_temps"] == 0
        assert up.path.exists()
    assert registry.blobs.temp_files() == []


def test_corrupted_blob_is_detected_on_download(registry: LocalRegistry, artifact: Path) -> None:
    v = registry.publish(artifact, "team/x")
    blob = registry.blobs.path_for(v.sha256)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(Exception, match="corrupt"):
        registry.download("team/x@1")


def test_resolve_reference_uses_the_environment(tmp_path: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "env-registry"
    LocalRegistry(root).publish(artifact, "team/sms-spam")
    monkeypatch.setenv("ADAPTERKIT_REGISTRY", str(root))
    path = resolve_reference("hub:team/sms-spam@1")
    assert path.read_bytes() == artifact.read_bytes()
    assert resolve_reference("hub:team/sms-spam") == path == resolve_reference("team/sms-spam@latest")
    with pytest.raises(NotFound):
        resolve_reference("hub:team/nope@1")
    with pytest.raises(BadRequest):
        resolve_reference("hub:../etc/passwd")
    # Without $ADAPTERKIT_REGISTRY: the default registry under $ADAPTERKIT_HOME.
    monkeypatch.delenv("ADAPTERKIT_REGISTRY")
    monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path / "home"))
    assert isinstance(open_registry(), LocalRegistry) and open_registry().root == tmp_path / "home"


def test_index_is_wal(registry: LocalRegistry) -> None:
    db = sqlite3.connect(registry.db_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
