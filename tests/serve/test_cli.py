"""``adapterkit serve`` as a real process: it starts, serves, and on SIGTERM drains and exits."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from adapterkit.serve.cli import parse_size


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Start ``adapterkit serve --port 0 ...``; return the process and the URL it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "adapterkit.cli", "serve", "--port", "0", "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if "Application startup complete" in line:
            url = next(s.split("listening on ")[1].strip() for s in seen if "listening on" in s)
            return proc, url
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(seen))


def test_sigterm_finishes_in_flight_requests_then_exits(minilm, artifacts):
    # Batches wait up to 1.5 s for company, so the requests below are still queued at SIGTERM.
    proc, url = start_server(
        [
            "--base",
            str(minilm),
            "--registry",
            str(artifacts),
            "--adapters",
            "sentiment,topic",
            "--max-wait-ms",
            "1500",
        ]
    )
    try:

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                bodies = [
                    {"adapter": a, "text": f"request {i}"} for i, a in enumerate(["sentiment", "topic"] * 2)
                ]
                in_flight = [asyncio.create_task(client.post("/v1/classify", json=b)) for b in bodies]
                deadline = time.monotonic() + 30
                while (await client.get("/health")).json()["queue_depth"] < len(bodies):
                    assert time.monotonic() < deadline, "requests never queued"
                    await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                # New connections are refused while the queued requests are still being answered.
                refused = False
                deadline = time.monotonic() + 10
                async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:
                    while not refused and time.monotonic() < deadline:
                        try:
                            await fresh.get("/health")
                            await asyncio.sleep(0.01)
                        except httpx.ConnectError:
                            refused = True
                still_pending = sum(not t.done() for t in in_flight)
                return refused, still_pending, await asyncio.gather(*in_flight)

        refused, still_pending, answers = asyncio.run(scenario())
        assert refused, "the server kept accepting connections after SIGTERM"
        assert still_pending > 0, (
            "the requests finished before the drain was observed; the test proves nothing"
        )
        assert [r.status_code for r in answers] == [200] * 4
        assert all(r.json()["batch_size"] == 4 for r in answers)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_startup_adapter_fails_fast(minilm, artifacts):
    cmd = [
        sys.executable,
        "-m",
        "adapterkit.cli",
        "serve",
        "--base",
        str(minilm),
        "--registry",
        str(artifacts),
    ]
    out = subprocess.run(
        [*cmd, "--port", "0", "--adapters", "alien"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "alien" in out.stdout + out.stderr


@pytest.mark.parametrize(
    "text, expected", [("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1000", 1000), ("1.5k", 1500)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected
