"""16 concurrent publishers and readers against one server: every artifact stored once, every
download byte-identical, versions never handed out twice."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hub_testing import Server, make_artifact, sha256

from adapterkit.hub import Conflict, LocalRegistry, RemoteRegistry

WORKERS = 16
READ_TARGETS = 4
READ_ROUNDS = 3
TIMEOUT = 120.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_concurrent_publishers_and_readers(hub_server: Server, tmp_path: Path) -> None:
    own = [make_artifact(tmp_path / f"own{i}.safetensors", seed=1000 + i) for i in range(WORKERS)]
    race = [make_artifact(tmp_path / f"race{i}.safetensors", seed=2000 + i) for i in range(WORKERS)]
    targets = [make_artifact(tmp_path / f"t{j}.safetensors", seed=3000 + j) for j in range(READ_TARGETS)]
    token = hub_server.tokens["alice"]
    with RemoteRegistry(hub_server.url, token, cache_dir=tmp_path / "setup") as reg:
        for j, t in enumerate(targets):
            reg.publish(t, f"conc-read/t{j}")
    target_bytes = [t.read_bytes() for t in targets]
    barrier = threading.Barrier(WORKERS, timeout=TIMEOUT)

    def worker(i: int) -> dict[str, str]:
        out: dict[str, str] = {}
        with RemoteRegistry(hub_server.url, token, cache_dir=tmp_path / f"cache{i}") as reg, httpx.Client(
            base_url=hub_server.url, timeout=TIMEOUT
        ) as http:
            barrier.wait()  # everyone starts together
            try:  # all race for the same explicit version
                reg.publish(race[i], "conc/race@1")
                out["race"] = "won"
            except Conflict:
                out["race"] = "lost"
            out["auto"] = reg.publish(own[i], "conc/auto").version  # all race for "next version"
            reg.publish(own[i], f"conc/w{i}")
            for _ in range(READ_ROUNDS):
                for j in range(READ_TARGETS):
                    r = http.get(f"/api/adapters/conc-read/t{j}/versions/1/file")
                    assert r.status_code == 200 and r.content == target_bytes[j]
                r = http.get("/api/adapters/conc/race/versions/1/file")
                assert r.status_code == 200
                out["race_sha"] = r.headers["x-content-sha256"]
            assert reg.download(f"conc/w{i}@1").read_bytes() == own[i].read_bytes()
            assert f"conc/w{i}@1" in [v.ref for v in reg.search(f"conc/w{i}")]
        return out

    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(worker, i) for i in range(WORKERS)]
        results = [f.result(timeout=TIMEOUT) for f in futures]

    winners = [i for i, r in enumerate(results) if r["race"] == "won"]
    assert len(winners) == 1
    assert {r["race_sha"] for r in results} == {sha256(race[winners[0]])}
    assert sorted(int(r["auto"]) for r in results) == list(range(1, WORKERS + 1))

    local = LocalRegistry(hub_server.root, reconcile=False)
    assert [v.version for v in local.versions("conc/race")] == ["1"]
    auto = local.versions("conc/auto")
    assert len(auto) == WORKERS and {v.sha256 for v in auto} == {sha256(p) for p in own}
    for i in range(WORKERS):
        (v,) = local.versions(f"conc/w{i}")
        assert v.sha256 == sha256(own[i])
    # Content-addressed: each distinct file is one blob, however many versions point at it.
    blobs = local.blobs.all_blobs()
    for p in [*own, *targets, race[winners[0]]]:
        assert sha256(p) in blobs
    assert not any(sha256(race[i]) in blobs for i in range(WORKERS) if i not in winners)
    assert local.check() == []
