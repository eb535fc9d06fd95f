"""SIGKILL the server in the middle of uploads, restart it: the index and the blob store agree, no
partial artifact is visible, every publish that was answered 201 is there."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from hub_testing import Server, create_tokens, make_artifact, sha256

from adapterkit.hub import HubError, LocalRegistry, RemoteRegistry

PARTIAL_UPLOADS = 3
BACKGROUND_PUBLISHES = 40
TIMEOUT = 60.0


def _start_partial_upload(server: Server, ref: str, body: bytes) -> socket.socket:
    """Send the headers and half the body, then stall: the server is mid-upload."""
    host, port = server.url.removeprefix("http://").split(":")
    ns, name = ref.split("/")
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    head = (
        f"POST /api/adapters/{ns}/{name}/versions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {server.tokens['alice']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    s.sendall(head.encode() + body[: len(body) // 2])
    return s


def _wait_for(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling an observable state, bounded by the deadline


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_upload_then_restart(tmp_path: Path) -> None:
    root = tmp_path / "root"
    server = Server(root, max_upload_mb=8)
    server.tokens = create_tokens(root)
    server.start()
    sockets: list[socket.socket] = []
    try:
        token = server.tokens["alice"]
        done = [make_artifact(tmp_path / f"done{i}.safetensors", seed=500 + i) for i in range(3)]
        with RemoteRegistry(server.url, token, cache_dir=tmp_path / "c") as reg:
            for i, p in enumerate(done):
                reg.publish(p, f"crash/done{i}")

        # A publisher keeps going in the background; what it was told succeeded must survive.
        succeeded: list[tuple[str, str]] = []
        stop = threading.Event()

        def publisher() -> None:
            with RemoteRegistry(server.url, token, cache_dir=tmp_path / "bg") as bg:
                for k in range(BACKGROUND_PUBLISHES):
                    if stop.is_set():
                        return
                    p = make_artifact(tmp_path / f"bg{k}.safetensors", seed=600 + k)
                    try:
                        v = bg.publish(p, f"crash/bg{k}")
                    except HubError:
                        return  # the server died under this request
                    succeeded.append((v.ref, sha256(p)))

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        _wait_for(lambda: len(succeeded) >= 3, "background publishes")

        partial = make_artifact(tmp_path / "partial.safetensors", seed=700).read_bytes()
        for i in range(PARTIAL_UPLOADS):
            sockets.append(_start_partial_upload(server, f"crash/partial{i}", partial))
        _wait_for(lambda: len(list((root / "tmp").iterdir())) >= PARTIAL_UPLOADS, "partial uploads on disk")

        server.kill()  # SIGKILL: no cleanup of any kind
        stop.set()
        thread.join(timeout=TIMEOUT)
        assert not thread.is_alive()
        assert len(list((root / "tmp").iterdir())) >= PARTIAL_UPLOADS  # the crash left temp files

        server.start()  # same root, fresh process: reconciles on start
        local = LocalRegistry(root, reconcile=False)
        assert local.check(deep=True) == []
        assert list((root / "tmp").iterdir()) == []
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
            for i in range(PARTIAL_UPLOADS):
                r = http.get(f"/api/adapters/crash/partial{i}")
                assert r.status_code == 404, r.text
            for i, p in enumerate(done):
                r = http.get(f"/api/adapters/crash/done{i}/versions/1/file")
                assert r.status_code == 200 and r.content == p.read_bytes()
            for ref, sha in succeeded:
                ns_name, version = ref.split("@")
                r = http.get(f"/api/adapters/{ns_name}/versions/{version}/file")
                assert r.status_code == 200 and r.headers["x-content-sha256"] == sha == sha256_bytes(r.content)
        # Every index row has its blob, every blob its row.
        db = sqlite3.connect(root / "index.db")
        rows = {r[0] for r in db.execute("SELECT sha256 FROM versions WHERE deleted = 0 AND missing = 0")}
        db.close()
        assert rows == set(local.blobs.all_blobs())
        # And it still takes publishes.
        with RemoteRegistry(server.url, token, cache_dir=tmp_path / "c2") as reg:
            assert reg.publish(tmp_path / "partial.safetensors", "crash/partial0").ref == "crash/partial0@1"
    finally:
        for s in sockets:
            s.close()
        server.stop()


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
