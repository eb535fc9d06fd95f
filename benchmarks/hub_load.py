"""Load on a hub server over loopback: publishes/s and downloads/s with p50/p99 latency.

    python benchmarks/hub_load.py --quick --json out/hub_load.json
    python benchmarks/hub_load.py --quick --backend both     # SQLite + folder beside PostgreSQL + S3

Starts a server subprocess on 127.0.0.1 (a fresh registry in a temp folder, or with ``--backend
postgres-s3`` a throwaway PostgreSQL cluster and SeaweedFS S3 gateway on loopback, see
``adapterkit.hub.devservers``), publishes a fixed number of distinct artifacts from ``--concurrency``
threads, then downloads a fixed number of them (checking each body's sha256). Every failed request,
wrong status or wrong byte counts in ``errors``. With ``both``, rounds alternate between the two
servers (both running) and the medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from adapterkit.hub.registry import LocalRegistry
from adapterkit.hub.tokens import TokenStore

START_TIMEOUT = 120.0


def make_artifacts(folder: Path, count: int, hidden: int, r: int, layers: int) -> list[Path]:
    """Distinct, valid artifacts (seeded Pfeiffer adapters) of one small random BERT: saved by
    ``save_adapter``, so they pass the hub's publish checks (tensor names and shapes from the config)."""
    from transformers import BertConfig, BertModel

    from adapterkit import AdapterConfig, AdapterModel

    heads = max(1, hidden // 64)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, vocab_size=1000)
    torch.manual_seed(0)
    model = AdapterModel(BertModel(config).eval())
    paths = []
    for i in range(count):
        torch.manual_seed(1000 + i)  # each artifact its own weights, so each is its own blob
        model.add_adapter(f"task{i}", AdapterConfig("pfeiffer", bottleneck_size=r))
        paths.append(model.save_adapter(f"task{i}", folder / f"a{i}.safetensors") or folder / f"a{i}.safetensors")
        model.delete_adapter(f"task{i}")
    return paths


def start_server(root: Path, log: Path, where: list[str] | None = None, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    where = where or ["--root", str(root)]
    cmd = [sys.executable, "-m", "adapterkit.hub", "serve", *where, "--fd", str(sock.fileno()), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, pass_fds=(sock.fileno(),), stdout=out, stderr=subprocess.STDOUT, env=env)
    sock.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_phase(jobs: list, concurrency: int, url: str, do) -> tuple[list[float], int, float]:
    """Run ``do(client, job)`` for every job from ``concurrency`` threads; latencies (s), errors, wall (s)."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    local = threading.local()

    def one(job) -> None:
        nonlocal errors
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=60)
        t0 = time.perf_counter()
        try:
            ok = do(local.client, job)
        except httpx.HTTPError:
            ok = False
        dt = time.perf_counter() - t0
        with lock:
            latencies.append(dt)
            errors += 0 if ok else 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, jobs))
    return latencies, errors, time.perf_counter() - start


def measure(url: str, token: str, ns: str, bodies: list[bytes], shas: list[str], downloads: int, concurrency: int) -> dict:
    """One round: publish every body into namespace ``ns``, then ``downloads`` random downloads."""
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}

    def publish(client: httpx.Client, i: int) -> bool:
        r = client.post(f"/api/adapters/{ns}/a{i}/versions", content=bodies[i], headers={**auth, "X-Content-SHA256": shas[i]})
        return r.status_code == 201 and r.json()["sha256"] == shas[i]

    pub_lat, pub_err, pub_wall = run_phase(list(range(len(bodies))), concurrency, url, publish)
    rng = random.Random(0)
    picks = [rng.randrange(len(bodies)) for _ in range(downloads)]

    def download(client: httpx.Client, i: int) -> bool:
        r = client.get(f"/api/adapters/{ns}/a{i}/versions/1/file")
        return r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == shas[i]

    dl_lat, dl_err, dl_wall = run_phase(picks, concurrency, url, download)
    return {
        "publish_per_s": len(bodies) / pub_wall, "publish_p50_ms": percentile(pub_lat, 50) * 1e3,
        "publish_p99_ms": percentile(pub_lat, 99) * 1e3, "download_per_s": downloads / dl_wall,
        "download_p50_ms": percentile(dl_lat, 50) * 1e3, "download_p99_ms": percentile(dl_lat, 99) * 1e3,
        "errors": pub_err + dl_err,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer requests (well under 2 minutes)")
    p.add_argument("--json", help="write the results as flat JSON here")
    p.add_argument("--backend", choices=("sqlite", "postgres-s3", "both"), default="sqlite",
                   help="sqlite: SQLite index + blob folder (default); postgres-s3: PostgreSQL + S3 (SeaweedFS)")
    p.add_argument("--rounds", type=int, help="measurements per backend, interleaved (default 1 quick, 3 full)")
    p.add_argument("--publishes", type=int)
    p.add_argument("--downloads", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--hidden", type=int, default=768, help="artifact size knob: hidden size of the made-up base")
    p.add_argument("--bottleneck", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args(argv)
    publishes = args.publishes or (40 if args.quick else 200)
    downloads = args.downloads or (400 if args.quick else 4000)
    concurrency = args.concurrency or (8 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 3)
    backends = ["sqlite", "postgres-s3"] if args.backend == "both" else [args.backend]

    with tempfile.TemporaryDirectory(prefix="hub-load-") as tmp, contextlib.ExitStack() as stack:
        tmp_path = Path(tmp)
        files = make_artifacts(tmp_path, publishes, args.hidden, args.bottleneck, args.layers)
        bodies = [f.read_bytes() for f in files]
        shas = [hashlib.sha256(b).hexdigest() for b in bodies]
        servers: dict[str, tuple[subprocess.Popen, str, str]] = {}
        for backend in backends:
            if backend == "sqlite":
                root = tmp_path / "root"
                token = TokenStore(LocalRegistry(root)).create("bench")[1]
                servers[backend] = (*start_server(root, tmp_path / "sqlite.log"), token)
            else:
                from adapterkit.hub.backends import open_backends
                from adapterkit.hub.devservers import DevPostgres, DevSeaweedS3

                pg = stack.enter_context(DevPostgres())
                s3 = stack.enter_context(DevSeaweedS3())
                s3.create_bucket("bench")
                os.environ.update(s3.env())
                index, blobs = pg.create_database("bench"), "s3://bench/hub"
                reg = open_backends(index, blobs, work_dir=tmp_path / "setup")
                token = TokenStore(reg).create("bench")[1]
                reg.close()
                env = {**os.environ, "ADAPTERKIT_HOME": str(tmp_path / "pg-home")}
                proc, url = start_server(tmp_path, tmp_path / "pg.log", ["--index", index, "--blobs", blobs], env)
                servers[backend] = (proc, url, token)
        try:
            per: dict[str, list[dict]] = {b: [] for b in backends}
            for r in range(rounds):
                for backend in backends:
                    _, url, token = servers[backend]
                    per[backend].append(measure(url, token, f"bench{r}", bodies, shas, downloads, concurrency))
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    size = len(bodies[0])
    result: dict = {
        "quick": bool(args.quick), "concurrency": concurrency, "artifact_bytes": size, "publishes": publishes,
        "downloads": downloads, "rounds": rounds, "cpu_count": os.cpu_count() or 0,
    }
    print(f"hub load on loopback: {concurrency} threads, artifacts of {size / 1024:.0f} KiB, {rounds} round(s) per backend")
    print(f"{'backend':13}{'':10}{'requests':>10}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    errors = 0
    for backend in backends:
        prefix = "" if backend == "sqlite" else "pg_s3_"
        runs = per[backend]
        errors += sum(m["errors"] for m in runs)
        for key in runs[0]:
            if key != "errors":
                result[prefix + key] = round(statistics.median(m[key] for m in runs), 2)
        for what, n in (("publish", publishes), ("download", downloads)):
            print(f"{backend:13}{what:10}{n:>10}{result[prefix + what + '_per_s']:>10}"
                  f"{result[prefix + what + '_p50_ms']:>10}{result[prefix + what + '_p99_ms']:>10}")
    result["errors"] = errors
    print(f"errors={errors}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
