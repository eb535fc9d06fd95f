"""Issue 15's findings against the model server, as an anonymous client (or a hostile publisher)
would try them, on a real MiniLM server on loopback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open
from safetensors.torch import save
from tinymodels import tiny_model

import adapterkit as ak
from adapterkit.artifact import METADATA_KEY
from adapterkit.serve import ServeConfig, create_app

from .conftest import running


def rewrite(src: Path, dest: Path, edit) -> Path:
    """``src`` with its adapterkit metadata passed through ``edit(doc)``; tensors unchanged."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(f.metadata()[METADATA_KEY])
    edit(doc)
    dest.write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(doc)}))
    return dest


@pytest.fixture(scope="module")
def folder(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sentiment, a corrupt file, and a 'memory bomb': sentiment's file claiming bottleneck 4000
    (~150 MB of modules on MiniLM, for a 1.5 MB file), under the cap of 8192, so only the shape
    check can stop it."""
    out = tmp_path_factory.mktemp("sec-adapters")
    for name in ("sentiment", "broken"):
        shutil.copy(artifacts / f"{name}.safetensors", out / f"{name}.safetensors")
    rewrite(artifacts / "sentiment.safetensors", out / "bomb.safetensors", lambda d: d["config"].update(bottleneck_size=4000))
    return out


@pytest.fixture(scope="module")
def server(minilm: Path, folder: Path):
    config = ServeConfig(base=str(minilm), registry=str(folder), max_wait_ms=1, max_body_bytes=256 << 10)
    with running(create_app(config)) as url:
        yield url


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


# -- finding 1: the memory bomb, and failed loads remembered -----------------------------------------


def test_a_bottleneck_claimed_but_not_held_is_422_remembered_and_costs_nothing(server: str) -> None:
    body = {"adapter": "bomb", "text": "x"}
    first = httpx.post(f"{server}/v1/classify", json=body, timeout=60)
    assert first.status_code == 422, first.text
    assert "tensor shapes do not match" in first.json()["detail"] and "4000" in first.json()["detail"]
    assert metric(server, "adapterkit_adapter_bytes") == 0  # nothing was built and kept
    again = httpx.post(f"{server}/v1/classify", json=body, timeout=60)
    assert again.status_code == 422 and again.json() == first.json()
    assert metric(server, "adapterkit_adapter_load_failures_remembered_total") >= 1  # not loaded again
    ok = httpx.post(f"{server}/v1/classify", json={"adapter": "sentiment", "text": "fine"}, timeout=60)
    assert ok.status_code == 200  # the server still answers


# -- finding 5: no 500s, no echo, no paths -----------------------------------------------------------


def test_a_corrupt_file_is_422_without_the_servers_path(server: str, folder: Path) -> None:
    r = httpx.post(f"{server}/v1/classify", json={"adapter": "broken", "text": "x"}, timeout=60)
    assert r.status_code == 422, r.text
    assert "'broken'" in r.json()["detail"] and str(folder) not in r.text and "/tmp" not in r.text
    r = httpx.post(f"{server}/v1/classify", json={"adapter": "missing", "text": "x"}, timeout=60)
    assert r.status_code == 404 and str(folder) not in r.text


def test_lone_surrogates_and_huge_bodies_get_short_4xx(server: str) -> None:
    headers = {"Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/classify", content=b'{"adapter": "sentiment", "text": "\\ud800"}', headers=headers, timeout=60)
    assert r.status_code == 422 and r.json()["detail"].startswith("text:") and len(r.content) < 500, r.text
    over_field = json.dumps({"adapter": "sentiment", "text": "a" * 200_000})  # over the 100,000 characters
    r = httpx.post(f"{server}/v1/classify", content=over_field, headers=headers, timeout=60)
    assert r.status_code == 422 and len(r.content) < 500, r.text[:500]
    big = json.dumps({"adapter": "sentiment", "text": "a" * (1 << 20)})  # over the body limit
    r = httpx.post(f"{server}/v1/classify", content=big, headers=headers, timeout=60)
    assert r.status_code == 413 and len(r.content) < 500, r.text[:500]

    def stream():  # no Content-Length: the limit holds while reading
        yield b'{"adapter": "sentiment", "text": "'
        for _ in range(64):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(f"{server}/v1/classify", content=stream(), headers=headers, timeout=60)
    assert r.status_code == 413 and len(r.content) < 500, r.text[:500]
    assert httpx.get(f"{server}/health").status_code == 200


# -- hardening: admin token ---------------------------------------------------------------------------


def test_load_and_unload_need_the_admin_token(minilm: Path, folder: Path) -> None:
    with pytest.raises(ValueError, match="needs an admin token"):
        create_app(ServeConfig(base=str(minilm), registry=str(folder), host="0.0.0.0"))
    token = "s3cret-admin-token"
    config = ServeConfig(base=str(minilm), registry=str(folder), admin_token=token, max_wait_ms=1)
    with running(create_app(config)) as url:
        good, bad = {"Authorization": f"Bearer {token}"}, {"Authorization": "Bearer nope"}
        assert httpx.post(f"{url}/v1/adapters", json={"adapter": "sentiment"}).status_code == 401
        assert httpx.post(f"{url}/v1/adapters", json={"adapter": "sentiment"}, headers=bad).status_code == 401
        assert httpx.get(f"{url}/v1/adapters", params={"available": "true"}).status_code == 401
        r = httpx.post(f"{url}/v1/adapters", json={"adapter": "sentiment"}, headers=good, timeout=60)
        assert r.status_code == 200 and r.json()["loaded"] is True
        assert httpx.delete(f"{url}/v1/adapters/sentiment").status_code == 401
        assert httpx.delete(f"{url}/v1/adapters/sentiment", headers=good).status_code == 200
        # Anonymous task requests still work (they load on demand).
        assert httpx.post(f"{url}/v1/classify", json={"adapter": "sentiment", "text": "x"}, timeout=60).status_code == 200
        statuses = [httpx.delete(f"{url}/v1/adapters/sentiment", headers=bad).status_code for _ in range(10)]
        assert statuses[-1] == 429 and httpx.delete(f"{url}/v1/adapters/sentiment", headers=good).status_code == 429


# -- hardening: one entry per resolved version; @latest re-resolved ----------------------------------


def test_spellings_of_one_version_share_one_entry_and_latest_moves(minilm: Path, artifacts: Path, tmp_path: Path) -> None:
    from adapterkit.hub import LocalRegistry

    registry = LocalRegistry(tmp_path / "registry")
    registry.publish(artifacts / "sentiment.safetensors", "team/sent")
    config = ServeConfig(base=str(minilm), registry=str(registry.root), max_wait_ms=1, latest_ttl_s=0.0)
    with running(create_app(config)) as url:
        for ref in ("team/sent", "team/sent@1", "hub:team/sent@1", "team/sent@latest", "team/sent@1.0.0"):
            r = httpx.post(f"{url}/v1/classify", json={"adapter": ref, "text": "fine"}, timeout=60)
            assert r.status_code == 200 and r.json()["adapter"] == ref, r.text
        listing = httpx.get(f"{url}/v1/adapters").json()
        assert [a["adapter"] for a in listing["loaded"]] == ["team/sent@1"]
        assert metric(url, "adapterkit_adapter_loads_total") == 1
        registry.publish(artifacts / "topic.safetensors", "team/sent")  # version 2 appears
        r = httpx.post(f"{url}/v1/classify", json={"adapter": "team/sent@latest", "text": "fine"}, timeout=60)
        assert r.status_code == 200 and set(r.json()["scores"]) == {"world", "sports", "business", "tech"}
        assert [a["adapter"] for a in httpx.get(f"{url}/v1/adapters").json()["loaded"]][-1] == "team/sent@2"


# -- hardening: a cap on adapters in use at once -----------------------------------------------------


def test_adapters_in_use_are_capped_by_count_and_budget(tmp_path: Path) -> None:
    from adapterkit.serve.cache import AdapterCache, CacheFull, FolderSource

    model = ak.AdapterModel(tiny_model("bert"))
    for i in range(4):
        model.add_adapter(f"a{i}", ak.AdapterConfig("houlsby", bottleneck_size=8), head="classification", labels=["x", "y"])
        model.save_adapter(f"a{i}", tmp_path / f"a{i}.safetensors")
        model.delete_adapter(f"a{i}")
    cache = AdapterCache(model, FolderSource(tmp_path), budget_bytes=1 << 30, max_pinned=2)
    cache.load_and_acquire("a0")
    cache.load_and_acquire("a1")
    with pytest.raises(CacheFull, match="in use"):
        cache.load_and_acquire("a2")  # two in use already
    cache.release("a0")
    assert cache.load_and_acquire("a2").ref == "a2"  # room again
    one = next(e.nbytes for e in cache.loaded())
    tight = AdapterCache(model, FolderSource(tmp_path), budget_bytes=one + one // 2)
    tight.load_and_acquire("a3")  # alone it always fits
    with pytest.raises(CacheFull, match="memory budget"):
        tight.load_and_acquire("a0")  # a3 is in use and two do not fit
    tight.release("a3")
    assert tight.load_and_acquire("a0").ref == "a0"  # a3 is evicted instead
    assert [e.ref for e in tight.loaded()] == ["a0"]
