"""What the hub tests share: small well-formed artifacts, a real server subprocess on loopback, and
snapshots of a registry folder (to show that nothing was stored).

A module of its own rather than conftest.py: several test folders have a conftest, and ``from conftest
import`` would depend on which one pytest loaded last."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from adapterkit.artifact import FORMAT, FORMAT_VERSION, expected_shapes, write_artifact
from adapterkit.hub.registry import IndexedRegistry, LocalRegistry
from adapterkit.hub.tokens import TokenStore

# A hang guard, not a window: start-up waits for /health to answer. Under a CPU hog on both cores
# (issue 10's loaded-machine run) importing the server took over 60 s, so the guard is generous.
SERVER_START_TIMEOUT = 300.0
MAX_UPLOAD_MB = 1.0


def fingerprint(model_type: str = "bert", hidden: int = 32, layers: int = 2, seed: int = 0, name: str = "tiny-bert") -> dict[str, Any]:
    """A well-formed base fingerprint (id built the way the core builds it: type-HxL-hash)."""
    g = torch.Generator().manual_seed(seed)
    probe = [round(float(v), 6) for v in torch.randn(15, generator=g)]
    short = hashlib.sha256(json.dumps([model_type, hidden, layers, probe]).encode()).hexdigest()[:12]
    return {
        "model_type": model_type,
        "name_or_path": name,
        "hidden_size": hidden,
        "num_layers": layers,
        "vocab_size": 1000,
        "probe": probe,
        "id": f"{model_type}-{hidden}x{layers}-{short}",
    }


def metadata(
    name: str = "sentiment",
    kind: str = "houlsby",
    bottleneck: int = 8,
    task_type: str = "classification",
    labels: list[str] | None = None,
    base: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    labels = ["neg", "pos"] if labels is None else labels
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": "0.1.0",
        "name": name,
        "config": {"kind": kind, "bottleneck_size": bottleneck, "activation": "relu"},
        "task": {"type": task_type, "labels": labels},
        "head": {"type": task_type, "num_labels": len(labels)} if task_type != "none" else None,
        "base": base or fingerprint(),
        "description": "",
    }
    doc.update(extra)
    return doc


def tensors(seed: int = 0, doc: dict[str, Any] | None = None, layers: int = 2) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the names and shapes the loader expects for ``doc`` (default:
    ``metadata()``) on a model of the fingerprint's hidden size with ``layers`` layers."""
    doc = doc or metadata()
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(doc, doc["base"]["hidden_size"], [0] * layers)
    return {k: torch.randn(shape, generator=g) * 1e-2 for k, shape in shapes.items()}


def make_artifact(path: Path, seed: int = 0, **meta: Any) -> Path:
    """Write a small, valid artifact; ``seed`` changes the bytes, ``meta`` the metadata."""
    doc = metadata(**meta)
    return write_artifact(path, tensors(seed, doc), doc)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> tuple[Any, ...]:
    """Everything a publish could leave behind: blob files, temp files, index rows, namespaces."""
    if (root / SHARED_BACKENDS).exists():
        return snapshot_shared(root)
    blobs = sorted(str(p.relative_to(root)) for p in (root / "blobs").rglob("*") if p.is_file())
    temps = sorted(os.listdir(root / "tmp"))
    db = sqlite3.connect(f"file:{root / 'index.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT namespace, name, version, sha256, yanked, deleted FROM versions ORDER BY 1, 2, 3").fetchall()
        namespaces = db.execute("SELECT name, owner FROM namespaces ORDER BY 1").fetchall()
    finally:
        db.close()
    return blobs, temps, rows, namespaces


def snapshot_shared(root: Path) -> tuple[Any, ...]:
    """``snapshot`` of a server on PostgreSQL + S3 whose folder ``root`` names its backends."""
    from adapterkit.hub.backends import open_backends

    spec = json.loads((root / SHARED_BACKENDS).read_text())
    reg = open_backends(spec["index"], spec["blobs"], work_dir=root / "snapshot-work", reconcile=False)
    try:
        blobs = sorted(reg.blobs.sizes())
        spool = root / "home" / "s3" / "tmp"
        temps = sorted(os.listdir(spool)) if spool.is_dir() else []
        with reg._read() as db:
            rows = [tuple(r) for r in db.execute("SELECT namespace, name, version, sha256, yanked, deleted FROM versions ORDER BY 1, 2, 3")]
            namespaces = [tuple(r) for r in db.execute("SELECT name, owner FROM namespaces ORDER BY 1")]
    finally:
        reg.close()
    return blobs, temps, rows, namespaces


SHARED_BACKENDS = "backends.json"


@dataclass
class Server:
    """A hub server subprocess on 127.0.0.1, serving on a socket the test bound (no port race).

    With ``index`` and ``blobs`` (PostgreSQL and S3 URLs) it serves those, with ``root`` holding
    only its log, its ``$ADAPTERKIT_HOME`` (S3 spool and cache) and a note of the URLs; ``env``
    adds variables (the AWS endpoint and keys)."""

    root: Path
    max_upload_mb: float = MAX_UPLOAD_MB
    proc: subprocess.Popen | None = None
    url: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    index: str | None = None
    blobs: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> Server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if self.index is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / SHARED_BACKENDS).write_text(json.dumps({"index": self.index, "blobs": self.blobs}))
            where = ["--index", self.index, "--blobs", str(self.blobs)]
            env = {**os.environ, **self.env, "ADAPTERKIT_HOME": str(self.root / "home")}
        else:
            where, env = ["--root", str(self.root)], {**os.environ, **self.env}
        cmd = [
            sys.executable, "-m", "adapterkit.hub", "serve", *where,
            "--fd", str(sock.fileno()), "--max-upload-mb", str(self.max_upload_mb), "--log-level", "warning",
        ]
        self.log = self.root.parent / f"server-{port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, pass_fds=(sock.fileno(),), stdout=log, stderr=subprocess.STDOUT, env=env)
        sock.close()  # the child has its own copy
        self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"hub server exited with {self.proc.returncode}:\n{self.log_text()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)  # polling interval while the server imports; not a synchronisation
        raise RuntimeError(f"hub server did not answer /health within {SERVER_START_TIMEOUT}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def create_tokens(root: Path | IndexedRegistry, owners: tuple[str, ...] = ("alice", "bob")) -> dict[str, str]:
    store = TokenStore(root if isinstance(root, IndexedRegistry) else LocalRegistry(root))
    tokens = {owner: store.create(owner)[1] for owner in owners}
    _, revoked = store.create("carol")
    store.revoke(revoked)
    tokens["revoked"] = revoked
    return tokens
