"""Two hub server processes on one PostgreSQL database and one S3 bucket, 16 concurrent clients spread
over both, one server SIGKILLed mid-load (with uploads in flight):

- the other keeps serving: every client finishes, those of the dead server by failing over to it;
- nothing lost: every publish that was answered 201 downloads, byte-identical, from the survivor;
- nothing half-visible: every listed version downloads and hashes to its row; a publish cut off by the
  kill is either wholly there or wholly absent (its retry gets 201, or 409 with the same sha256);
- racing publishers of one name@version across both servers: exactly one wins;
- afterwards ``adapterkit hub reconcile`` leaves index and bucket in exact agreement, and the killed
  server, restarted, removes its dead uploads and serves again.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from backend_fixtures import SharedBackends
from hub_testing import Server, create_tokens, make_artifact, sha256

from adapterkit.hub import Conflict, RemoteRegistry, Unavailable

pytestmark = pytest.mark.slow

CLIENTS = 16
PUBLISHES_PER_CLIENT = 3
KILL_AFTER = 12  # answered publishes before the SIGKILL: mid-load, not before and not after
PARTIAL_UPLOADS = 2
TIMEOUT = 240.0


def _wait_for(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling an observable state, bounded by the deadline


def _stall_upload(server: Server, ref: str, body: bytes) -> socket.socket:
    """Headers and half the body, then nothing: an upload the server is in the middle of."""
    host, port = server.url.removeprefix("http://").split(":")
    ns, name = ref.split("/")
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    s.sendall(
        (
            f"POST /api/adapters/{ns}/{name}/versions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server.tokens['alice']}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body[: len(body) // 2]
    )
    return s


@pytest.mark.timeout(600)
def test_two_servers_one_sigkilled_mid_load(shared_backends: SharedBackends, tmp_path: Path) -> None:
    reg = shared_backends.open(tmp_path / "setup")
    tokens = create_tokens(reg)
    reg.close()
    servers = [
        Server(tmp_path / name, max_upload_mb=8, index=shared_backends.index, blobs=shared_backends.blobs, env=shared_backends.env)
        for name in ("a", "b")
    ]
    for server in servers:
        server.tokens = tokens
        server.start()
    victim, survivor = servers
    token = tokens["alice"]
    artifacts = [
        [make_artifact(tmp_path / f"c{i}-{k}.safetensors", seed=10_000 + 100 * i + k) for k in range(PUBLISHES_PER_CLIENT)]
        for i in range(CLIENTS)
    ]
    race = [make_artifact(tmp_path / f"race{i}.safetensors", seed=20_000 + i) for i in range(CLIENTS)]

    lock = threading.Lock()
    answered: list[tuple[str, str]] = []  # (ref, sha256) of every publish answered 201
    outcomes: dict[str, str] = {}  # how each cut-off publish ended after its retry
    race_results: list[tuple[int, str]] = []
    failovers = [0]
    sockets: list[socket.socket] = []
    barrier = threading.Barrier(CLIENTS, timeout=TIMEOUT)

    def client(i: int) -> None:
        order = [victim, survivor] if i % 2 == 0 else [survivor, victim]
        regs = [RemoteRegistry(s.url, token, cache_dir=tmp_path / f"cache{i}-{j}", timeout=60) for j, s in enumerate(order)]
        current = 0

        def call(op):
            """Run op(registry) on the current server; on a dead one, switch for good and retry."""
            nonlocal current
            try:
                return op(regs[current]), False
            except Unavailable:
                if current == 1:
                    raise
                current = 1
                with lock:
                    failovers[0] += 1
                return op(regs[current]), True

        try:
            barrier.wait()
            for k, path in enumerate(artifacts[i]):
                ref = f"load/c{i}-{k}@1"
                try:
                    v, retried = call(lambda r, p=path, ref=ref: r.publish(p, ref))
                    with lock:
                        answered.append((v.ref, v.sha256))
                        if retried:
                            outcomes[ref] = "retried: 201"
                except Conflict:
                    # Only possible on a retry: the first attempt committed before the kill. Then
                    # the stored version must be exactly this file.
                    assert regs[1].info(ref).sha256 == sha256(path)
                    with lock:
                        answered.append((ref, sha256(path)))
                        outcomes[ref] = "retried: 409, same sha256"
                if k == 0:
                    try:
                        call(lambda r: r.publish(race[i], "load/race@1"))
                        won = "won"
                    except Conflict:
                        won = "lost"
                    with lock:
                        race_results.append((i, won))
                # Read back something another client published (whichever server answers).
                with lock:
                    others = [ref for ref, _ in answered if not ref.startswith(f"load/c{i}-")]
                if others:
                    got, _ = call(lambda r, ref=others[-1]: r.download(ref))
                    assert got.stat().st_size > 0
        finally:
            for r in regs:
                r.close()

    partial = make_artifact(tmp_path / "partial.safetensors", seed=30_000).read_bytes()
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            client(i)
        except BaseException as e:  # reported below with the client's number
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        _wait_for(lambda: len(answered) >= KILL_AFTER // 2, "the load to start")
        for j in range(PARTIAL_UPLOADS):
            sockets.append(_stall_upload(victim, f"load/partial{j}", partial))
        _wait_for(lambda: len(answered) >= KILL_AFTER, f"{KILL_AFTER} answered publishes")
        victim.kill()  # SIGKILL: no cleanup of any kind
        killed_at = len(answered)
        for t in threads:
            t.join(timeout=TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        assert errors == [], errors

        # Mid-load: some publishes were answered before the kill and some after it.
        total = CLIENTS * PUBLISHES_PER_CLIENT
        assert KILL_AFTER <= killed_at < total and len(answered) == total
        assert failovers[0] >= 1  # clients of the dead server really moved
        # Exactly one racer won, across both servers.
        assert sorted(won for _, won in race_results).count("won") == 1 and len(race_results) == CLIENTS
        winner = next(i for i, won in race_results if won == "won")

        with httpx.Client(base_url=survivor.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            for ref, sha in answered:  # nothing lost
                ns_name, version = ref.split("@")
                r = http.get(f"/api/adapters/{ns_name}/versions/{version}/file")
                assert r.status_code == 200, (ref, r.text)
                assert r.headers["x-content-sha256"] == sha == hashlib.sha256(r.content).hexdigest()
            r = http.get("/api/adapters/load/race/versions/1/file")
            assert hashlib.sha256(r.content).hexdigest() == sha256(race[winner])
            for j in range(PARTIAL_UPLOADS):  # the uploads in flight at the kill left nothing visible
                assert http.get(f"/api/adapters/load/partial{j}").status_code == 404
            listed = http.get("/api/adapters", params={"limit": 1000}).json()["adapters"]
            assert len(listed) == CLIENTS * PUBLISHES_PER_CLIENT + 1
            for doc in listed:  # nothing half-visible: every listed version is whole
                r = http.get(f"/api/adapters/{doc['namespace']}/{doc['name']}/versions/{doc['version']}/file")
                assert hashlib.sha256(r.content).hexdigest() == doc["sha256"]

        # Reconcile (what a restarted server does on start) leaves index and bucket in agreement.
        done = subprocess.run(
            [sys.executable, "-m", "adapterkit.hub", "reconcile", "--index", shared_backends.index,
             "--blobs", shared_backends.blobs, "--deep"],
            env={**os.environ, **shared_backends.env, "ADAPTERKIT_HOME": str(tmp_path / "reconcile-home")},
            capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        check = shared_backends.open(tmp_path / "check", reconcile=False)
        try:
            assert check.check(deep=False) == []
            with check._read() as db:
                live = {r[0] for r in db.execute("SELECT sha256 FROM versions WHERE deleted = 0")}
            assert live == set(check.blobs.sizes())
        finally:
            check.close()
        # The killed server, restarted on its own machine (same folder), clears its dead uploads.
        spool = victim.root / "home" / "s3" / "tmp"
        assert len(list(spool.iterdir())) >= PARTIAL_UPLOADS
        victim.start()
        assert list(spool.iterdir()) == []
        ref, sha = answered[0]
        with RemoteRegistry(victim.url, cache_dir=tmp_path / "after") as again:
            assert sha256(again.download(ref)) == sha
        print(f"\nfailover: killed after {killed_at}/{total} answered publishes; {failovers[0]} client failovers; "
              f"cut-off publishes: {outcomes or 'none'}; reconcile: {done.stdout.strip()}")
    finally:
        for s in sockets:
            s.close()
        for server in servers:
            server.stop()

