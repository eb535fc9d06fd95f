"""``adapterkit serve`` as a real process: it starts, serves, and on SIGTERM drains and exits."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from adapterkit.serve.cli import parse_size

# An upper bound on any one wait, so that a hung server fails the test instead of hanging it. It is
# never what a test waits for: every wait ends on an event (a line printed, a state, a refusal).
HANG_GUARD_S = 300


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Start ``adapterkit serve --port 0 ...``; return the process and the URL it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "adapterkit.cli", "serve", "--port", "0", "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    deadline = time.monotonic() + HANG_GUARD_S
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


def read_head(sock: socket.socket) -> bytes:
    """Read one HTTP response head (up to the blank line) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    return data


def test_sigterm_finishes_in_flight_requests_then_exits(minilm, artifacts):
    """SIGTERM: new connections are refused at once, every queued request is still answered, exit 0.

    No clock decides anything here: the batch can only run once it is full (5 rows; --max-wait-ms is
    ten minutes), and its fifth row is a request whose body the test holds back until it has seen
    the server refuse a new connection. So the four queued requests are provably still in flight when
    the refusal is observed, however slowly a loaded machine runs either process.
    """
    proc, url = start_server(
        ["--base", str(minilm), "--registry", str(artifacts), "--adapters", "sentiment,topic",
         "--max-batch-size", "5", "--max-wait-ms", "600000", "--graceful-timeout", str(HANG_GUARD_S)]
    )
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as client:
                bodies = [
                    {"adapter": a, "text": f"request {i}"} for i, a in enumerate(["sentiment", "topic"] * 2)
                ]
                in_flight = [asyncio.create_task(client.post("/v1/classify", json=b)) for b in bodies]
                while (await client.get("/health")).json()["queue_depth"] < len(bodies):
                    await asyncio.sleep(0.01)  # polling a state; every step of it is bounded above

                # The fifth request: headers now, body later. "100 Continue" comes back only once the
                # server has parsed the request and the app is waiting for the body: a state, not a guess.
                body = json.dumps({"adapter": "topic", "text": "request 4"}).encode()
                held = socket.create_connection((host, int(port)), timeout=HANG_GUARD_S)
                held.sendall(
                    f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
                )
                assert (await asyncio.to_thread(read_head, held)).startswith(b"HTTP/1.1 100"), "no 100 Continue"

                proc.send_signal(signal.SIGTERM)
                guard = time.monotonic() + HANG_GUARD_S
                while True:  # until the listening socket is closed
                    assert time.monotonic() < guard, "the server kept accepting connections after SIGTERM"
                    try:
                        socket.create_connection((host, int(port)), timeout=HANG_GUARD_S).close()
                    except ConnectionRefusedError:
                        break
                    await asyncio.sleep(0.01)
                still_pending = sum(not t.done() for t in in_flight)

                held.sendall(body)  # completes the batch: all five rows run in one forward pass
                head = await asyncio.to_thread(read_head, held)
                held.close()
                return still_pending, head, await asyncio.gather(*in_flight)

        still_pending, head, answers = asyncio.run(scenario())
        assert still_pending == 4, "a queued request finished before the drain; the batch rule is broken"
        assert head.startswith(b"HTTP/1.1 200"), head
        assert [r.status_code for r in answers] == [200] * 4
        assert all(r.json()["batch_size"] == 5 for r in answers)
        assert proc.wait(timeout=HANG_GUARD_S) == 0
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
        [*cmd, "--port", "0", "--adapters", "alien"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert out.returncode != 0
    assert "alien" in out.stdout + out.stderr


@pytest.mark.parametrize(
    "text, expected", [("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1000", 1000), ("1.5k", 1500)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected
