"""Bad input against the real server on loopback: each case gets a 4xx, a JSON error saying what is
wrong, and leaves the blob store and the index exactly as they were."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hub_testing import Server, fingerprint, make_artifact, metadata, snapshot, tensors
from safetensors.torch import save

from adapterkit.artifact import METADATA_KEY


def raw_safetensors(doc: object | None = None, raw_meta: dict[str, str] | None = None, t: dict | None = None) -> bytes:
    """A safetensors file with arbitrary (possibly broken) adapterkit metadata, bypassing write_artifact's checks."""
    meta = raw_meta if raw_meta is not None else ({METADATA_KEY: json.dumps(doc)} if doc is not None else None)
    return save(t if t is not None else tensors(5), metadata=meta)


@dataclass
class Ctx:
    server: Server
    client: httpx.Client
    good: bytes  # a valid artifact not yet published anywhere

    def auth(self, who: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.tokens[who]}"}

    def post(self, path: str, body: bytes | None = None, who: str | None = "alice", **kw) -> httpx.Response:
        headers = {**(self.auth(who) if who else {}), **kw.pop("headers", {})}
        return self.client.post(path, content=self.good if body is None else body, headers=headers, **kw)


def raw_request(server: Server, head: str, body: bytes = b"", half_close: bool = True) -> tuple[int, dict]:
    """Send bytes as they are (no client-side URL cleanup); return status and JSON body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode("latin-1") + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


def _over_limit_declared(c: Ctx) -> httpx.Response:
    # Claims a gigabyte and sends none of it: refused from the header alone.
    head = (
        "POST /api/adapters/team-a/huge/versions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {c.server.tokens['alice']}\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n"
    )
    status, doc = raw_request(c.server, head, half_close=False)  # an EOF would read as a client gone away
    return httpx.Response(status, json=doc)


def _over_limit_streamed(c: Ctx) -> httpx.Response:
    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(20):
            yield b"\0" * (64 << 10)

    return c.client.post("/api/adapters/team-a/huge2/versions", content=chunks(), headers=c.auth())


def _truncated_in_transit(c: Ctx) -> httpx.Response:
    sha = hashlib.sha256(c.good).hexdigest()
    return c.post("/api/adapters/team-a/cut/versions", c.good[: len(c.good) - 100], headers={"X-Content-SHA256": sha})


def _absolute_path(c: Ctx) -> httpx.Response:
    status, doc = raw_request(c.server, "GET /api/adapters/%2Fetc%2Fpasswd/versions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return httpx.Response(status, json=doc)


def _dotdot_namespace(c: Ctx) -> httpx.Response:
    head = (
        "POST /api/adapters/%2e%2e/x/versions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {c.server.tokens['alice']}\r\nContent-Length: {len(c.good)}\r\nConnection: close\r\n\r\n"
    )
    status, doc = raw_request(c.server, head, c.good)
    return httpx.Response(status, json=doc)


def _bad_fp_id() -> bytes:
    fp = fingerprint()
    fp["id"] = "gpt2-768x12-000000000000"
    return raw_safetensors(metadata(base=fp))


def _nan() -> bytes:
    t = tensors(6)
    t["head.out.weight"][0, 0] = float("nan")
    return raw_safetensors(metadata(), t=t)


def _wrong_base() -> str:
    return json.dumps(fingerprint(seed=99))


CASES: list[tuple[str, Callable[[Ctx], httpx.Response], int, str]] = [
    # names and versions
    ("dotdot-namespace", _dotdot_namespace, 400, "namespace '..' contains '..'"),
    ("traversal-in-name", lambda c: c.post("/api/adapters/team-a/..%2F..%2Fetc/versions"), 400, "contains '..'"),
    ("absolute-path", _absolute_path, 400, "looks like an absolute path"),
    ("empty-name", lambda c: c.post("/api/adapters/team-a//versions"), 400, "adapter name is empty"),
    ("overlong-name", lambda c: c.post(f"/api/adapters/team-a/{'a' * 65}/versions"), 400, "65 characters long"),
    ("cyrillic-homoglyph", lambda c: c.post("/api/adapters/team-a/s\u0435ntiment/versions"), 400, "CYRILLIC SMALL LETTER IE"),
    ("zero-width-space", lambda c: c.post("/api/adapters/team-a/spam\u200b/versions"), 400, "ZERO WIDTH SPACE"),
    ("control-character", lambda c: c.post("/api/adapters/team-a/ab%01c/versions"), 400, "control character"),
    ("uppercase-name", lambda c: c.post("/api/adapters/Team-A/x/versions"), 400, "namespace 'Team-A' is not allowed"),
    ("leading-dash", lambda c: c.post("/api/adapters/team-a/-x/versions"), 400, "is not allowed"),
    ("bad-version", lambda c: c.post("/api/adapters/team-a/x/versions", params={"version": "v1"}), 400, "version 'v1' is not valid"),
    ("publish-latest", lambda c: c.post("/api/adapters/team-a/x/versions", params={"version": "latest"}), 400, "'latest' is not a version you can publish"),
    # size and transfer
    ("over-limit-declared", _over_limit_declared, 413, "at most 1048576 bytes"),
    ("over-limit-streamed", _over_limit_streamed, 413, "over 1048576 bytes"),
    ("truncated-in-transit", _truncated_in_transit, 422, "incomplete or corrupted"),
    ("bad-sha-header", lambda c: c.post("/api/adapters/team-a/x/versions", headers={"X-Content-SHA256": "xyz"}), 400, "64 lowercase hex"),
    ("empty-body", lambda c: c.post("/api/adapters/team-a/x/versions", b""), 422, "upload is empty"),
    # file contents
    ("truncated-file", lambda c: c.post("/api/adapters/team-a/x/versions", c.good[: len(c.good) // 2]), 422, "truncated or corrupt"),
    ("not-safetensors", lambda c: c.post("/api/adapters/team-a/x/versions", b"PK\x03\x04 this is a zip, not safetensors" * 4), 422, "safetensors"),
    ("no-metadata", lambda c: c.post("/api/adapters/team-a/x/versions", raw_safetensors()), 422, "no adapterkit metadata"),
    ("metadata-not-json", lambda c: c.post("/api/adapters/team-a/x/versions", raw_safetensors(raw_meta={METADATA_KEY: "{oops"})), 422, "not valid JSON"),
    ("metadata-missing-base", lambda c: c.post("/api/adapters/team-a/x/versions", raw_safetensors({k: v for k, v in metadata().items() if k != "base"})), 422, "lacks required key(s) base"),
    ("metadata-wrong-format", lambda c: c.post("/api/adapters/team-a/x/versions", raw_safetensors(metadata(format="peft.lora"))), 422, "metadata format is 'peft.lora'"),
    ("metadata-future-version", lambda c: c.post("/api/adapters/team-a/x/versions", raw_safetensors(metadata(format_version=99))), 422, "format_version 99 is not supported"),
    ("metadata-no-kind", lambda c: c.post("/api/adapters/team-a/x/versions", raw_safetensors(metadata(config={"bottleneck_size": 8}))), 422, "config.kind"),
    ("no-tensors", lambda c: c.post("/api/adapters/team-a/x/versions", raw_safetensors(metadata(), t={})), 422, "no tensors"),
    ("nan-tensor", lambda c: c.post("/api/adapters/team-a/x/versions", _nan()), 422, "NaN"),
    ("fingerprint-inconsistent", lambda c: c.post("/api/adapters/team-a/x/versions", _bad_fp_id()), 422, "fingerprint is inconsistent"),
    ("fingerprint-not-declared-base", lambda c: c.post("/api/adapters/team-a/x/versions", params={"base": _wrong_base()}), 422, "does not match the declared base"),
    ("base-id-not-declared", lambda c: c.post("/api/adapters/team-a/x/versions", params={"base": "bert-32x2-ffffffffffff"}), 422, "does not match the declared base"),
    # immutability
    ("republish-version", lambda c: c.post("/api/adapters/team-a/existing/versions", params={"version": "1"}), 409, "already exists"),
    ("republish-deleted-version", lambda c: c.post("/api/adapters/team-a/existing/versions", params={"version": "2"}), 409, "published and deleted"),
    # tokens and ownership
    ("missing-token", lambda c: c.post("/api/adapters/team-a/x/versions", who=None), 401, "publishing needs a token"),
    ("malformed-token", lambda c: c.post("/api/adapters/team-a/x/versions", who=None, headers={"Authorization": "Bearer hunter2"}), 401, "malformed"),
    ("unknown-token", lambda c: c.post("/api/adapters/team-a/x/versions", who=None, headers={"Authorization": "Bearer akt_000000000000_" + "A" * 43}), 401, "unknown to this server"),
    ("revoked-token", lambda c: c.post("/api/adapters/team-a/x/versions", who="revoked"), 401, "was revoked"),
    ("basic-auth", lambda c: c.post("/api/adapters/team-a/x/versions", who=None, headers={"Authorization": "Basic YWxpY2U6eA=="}), 400, "Bearer"),
    ("other-namespace", lambda c: c.post("/api/adapters/team-a/x/versions", who="bob"), 403, "belongs to 'alice'"),
    ("yank-other-namespace", lambda c: c.client.post("/api/adapters/team-a/existing/versions/1/yank", headers=c.auth("bob"), json={}), 403, "belongs to 'alice'"),
    ("delete-without-token", lambda c: c.client.delete("/api/adapters/team-a/existing/versions/1"), 401, "needs a token"),
    # malformed parameters and JSON
    ("metrics-not-json", lambda c: c.post("/api/adapters/team-a/x/versions", params={"metrics": "{accuracy: 0.9"}), 400, "metrics is not valid JSON"),
    ("metrics-not-object", lambda c: c.post("/api/adapters/team-a/x/versions", params={"metrics": "[0.9]"}), 400, "metrics must be a JSON object"),
    ("metrics-nan", lambda c: c.post("/api/adapters/team-a/x/versions", params={"metrics": '{"acc": NaN}'}), 400, "must be finite"),
    ("description-overlong", lambda c: c.post("/api/adapters/team-a/x/versions", params={"description": "d" * 4001}), 400, "at most 4000"),
    ("yank-body-not-json", lambda c: c.client.post("/api/adapters/team-a/existing/versions/1/yank", headers={**c.auth(), "Content-Type": "application/json"}, content=b"{reason:"), 400, "not valid JSON"),
    ("yank-body-not-object", lambda c: c.client.post("/api/adapters/team-a/existing/versions/1/yank", headers=c.auth(), json=["x"]), 400, "must be a JSON object"),
    ("search-bad-limit", lambda c: c.client.get("/api/adapters", params={"limit": "0"}), 400, "limit"),
    # unknown things
    ("unknown-adapter", lambda c: c.client.get("/api/adapters/team-a/nope"), 404, "no adapter 'team-a/nope'"),
    ("unknown-version", lambda c: c.client.get("/api/adapters/team-a/existing/versions/7/file"), 404, "has no version '7'"),
    ("deleted-version", lambda c: c.client.get("/api/adapters/team-a/existing/versions/2/file"), 404, "was deleted"),
    ("yank-unknown-version", lambda c: c.client.post("/api/adapters/team-a/existing/versions/9/yank", headers=c.auth(), json={}), 404, "has no version '9'"),
    ("unknown-endpoint", lambda c: c.client.get("/api/nothing-here"), 404, "no such endpoint"),
    ("wrong-method", lambda c: c.client.put("/health"), 405, "not allowed"),
]


@pytest.fixture(scope="module")
def ctx(hub_server: Server, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    good = make_artifact(tmp / "good.safetensors", seed=123).read_bytes()
    existing = make_artifact(tmp / "existing.safetensors", seed=124).read_bytes()
    other = make_artifact(tmp / "other.safetensors", seed=125).read_bytes()
    with httpx.Client(base_url=hub_server.url, timeout=60) as client:
        auth = {"Authorization": f"Bearer {hub_server.tokens['alice']}"}
        for body in (existing, other):  # team-a/existing@1 stays, @2 is deleted
            assert client.post("/api/adapters/team-a/existing/versions", content=body, headers=auth).status_code == 201
        assert client.delete("/api/adapters/team-a/existing/versions/2", headers=auth).status_code == 200
        yield Ctx(hub_server, client, good)


def test_there_are_at_least_25_distinct_cases() -> None:
    assert len({name for name, *_ in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize(("name", "send", "status", "text"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_nothing_is_stored(ctx: Ctx, name: str, send, status: int, text: str) -> None:
    before = snapshot(ctx.server.root)
    response = send(ctx)
    assert response.status_code == status, response.text
    assert 400 <= response.status_code < 500
    doc = response.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
    assert text in doc["error"], doc["error"]
    assert snapshot(ctx.server.root) == before
    assert ctx.client.get("/health").status_code == 200  # the server is still fine


def test_upload_cut_off_by_the_client_stores_nothing(ctx: Ctx) -> None:
    """A body that stops halfway and a client that goes away: nothing stored, server fine."""
    before = snapshot(ctx.server.root)
    host, port = ctx.server.url.removeprefix("http://").split(":")
    head = (
        "POST /api/adapters/team-a/gone/versions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ctx.server.tokens['alice']}\r\nContent-Length: {len(ctx.good)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode() + ctx.good[: len(ctx.good) // 2])
    # The server drops the temp file when it sees the disconnect; wait (bounded) for that state.
    deadline = time.monotonic() + 20
    while snapshot(ctx.server.root) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert snapshot(ctx.server.root) == before
    assert ctx.client.get("/api/adapters/team-a/gone").status_code == 404
    assert ctx.client.get("/health").status_code == 200


def test_good_file_still_publishes_after_all_that(ctx: Ctx, tmp_path: Path) -> None:
    r = ctx.post("/api/adapters/team-a/fine/versions", ctx.good)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(ctx.good).hexdigest()
