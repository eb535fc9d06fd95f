"""Issue 15's findings against the hub, each as an attacker would try it, on a real server on loopback.

Artifacts here come from a real (tiny, random) model through ``save_adapter``; the hostile ones are
those files with their metadata rewritten, exactly what a publisher with a token could upload.
"""

from __future__ import annotations

import ast
import html
import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hub_testing import Server, create_tokens, snapshot
from safetensors import safe_open
from safetensors.torch import save
from tinymodels import tiny_model

import adapterkit as ak
from adapterkit.artifact import METADATA_KEY
from adapterkit.hub import HubError, LocalRegistry, RemoteRegistry
from adapterkit.hub.cli import main as hub_main

INJECTION = "x')); __import__('os').system('touch /tmp/adapterkit-pwned') #"


@pytest.fixture(scope="module")
def real_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real houlsby adapter (r=8) with a 2-label head, saved from a tiny BERT."""
    model = ak.AdapterModel(tiny_model("bert"))
    model.add_adapter("sst", ak.AdapterConfig("houlsby", bottleneck_size=8), head="classification", labels=["neg", "pos"])
    path = tmp_path_factory.mktemp("real") / "sst.safetensors"
    model.save_adapter("sst", path)
    return path


def rewrite(src: Path, dest: Path, edit) -> Path:
    """``src`` with its adapterkit metadata passed through ``edit(doc)``; tensors unchanged."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(f.metadata()[METADATA_KEY])
    edit(doc)
    dest.write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(doc)}))
    return dest


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A hub of this module's own (its failed-auth counter must not meet other modules' tests)."""
    root = tmp_path_factory.mktemp("sec-hub") / "root"
    tokens = create_tokens(root)
    srv = Server(root, max_upload_mb=4)
    srv.tokens = tokens
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def auth(server: Server, who: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {server.tokens[who]}"}


def publish(server: Server, path: Path, ref: str, who: str = "alice", **params: str) -> httpx.Response:
    ns, name = ref.split("/")
    return httpx.post(
        f"{server.url}/api/adapters/{ns}/{name}/versions", content=path.read_bytes(), headers=auth(server, who), params=params, timeout=60
    )


# -- finding 1: a bottleneck claimed by the metadata and not held by the tensors ------------------


def test_publish_refuses_a_bottleneck_its_tensors_do_not_have(server: Server, real_artifact: Path, tmp_path: Path) -> None:
    bomb = rewrite(real_artifact, tmp_path / "bomb.safetensors", lambda d: d["config"].update(bottleneck_size=4000))
    before = snapshot(server.root)
    r = publish(server, bomb, "bombs/wide")
    assert r.status_code == 422, r.text
    assert "tensor shapes do not match" in r.json()["error"] and "(4000, 32)" in r.json()["error"]
    assert snapshot(server.root) == before  # nothing stored
    over = rewrite(real_artifact, tmp_path / "over.safetensors", lambda d: d["config"].update(bottleneck_size=10**9))
    r = publish(server, over, "bombs/over")
    assert r.status_code == 422 and "over the cap" in r.json()["error"], r.text
    labels = rewrite(real_artifact, tmp_path / "labels.safetensors", lambda d: d["task"].update(labels=[f"l{i}" for i in 40000 * [0]]))
    assert publish(server, labels, "bombs/labels").status_code == 422
    assert snapshot(server.root) == before
    assert httpx.get(server.url + "/health").status_code == 200


# -- finding 2: the page's copy-paste snippet --------------------------------------------------------


def snippet_of(page: str) -> str:
    m = re.search(r'<pre id="snippet"><code>(.*?)</code></pre>', page, re.S)
    assert m, page[:2000]
    return html.unescape(m.group(1))


def calls(code: str) -> set[str]:
    """The names of the functions a snippet calls."""
    return {ast.unparse(node.func) for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)}


def test_snippet_never_turns_publisher_text_or_host_header_into_code(server: Server, real_artifact: Path, tmp_path: Path) -> None:
    def hostile(doc: dict) -> None:
        doc["base"]["name_or_path"] = INJECTION

    art = rewrite(real_artifact, tmp_path / "evil.safetensors", hostile)
    assert publish(server, art, "evil/snippet").status_code == 201
    page = httpx.get(server.url + "/adapters/evil/snippet", headers={"Host": "x');__import__('os').system('id');('"}).text
    code = snippet_of(page)
    assert calls(code) == {"AdapterModel", "AutoModel.from_pretrained", "model.load_adapter"}, code
    assert "__import__" not in code and "os.system" not in code
    assert f"'{server.url}'" in code  # the bound address, not the Host header
    # A normal model id is kept, as a Python literal.
    assert publish(server, real_artifact, "evil/plain").status_code == 201
    code = snippet_of(httpx.get(server.url + "/adapters/evil/plain").text)
    assert "AutoModel.from_pretrained(" in code and "model.load_adapter('hub:evil/plain@1')" in code


# -- finding 3: namespaces written locally have an owner ---------------------------------------------


def test_a_locally_pushed_namespace_cannot_be_taken_over_through_the_server(real_artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    LocalRegistry(root).publish(real_artifact, "local-team/model")  # a push into the folder, no token
    legacy = LocalRegistry(root)
    legacy.publish(real_artifact, "legacy-team/model")
    with sqlite3.connect(root / "index.db") as db:  # as an older adapterkit left it: no owner row
        db.execute("DELETE FROM namespaces WHERE name = 'legacy-team'")
    tokens = create_tokens(root)
    server = Server(root)
    server.tokens = tokens
    server.start()
    try:
        for ns in ("local-team", "legacy-team"):
            before = snapshot(root)
            base = f"{server.url}/api/adapters/{ns}/model/versions"
            answers = [
                httpx.post(base + "/1/yank", headers=auth(server, "bob"), json={"reason": "mine now"}),
                httpx.delete(base + "/1", headers=auth(server, "bob")),
                httpx.post(base, headers=auth(server, "bob"), content=real_artifact.read_bytes()),
            ]
            assert [a.status_code for a in answers] == [403, 403, 403], [a.text for a in answers]
            assert snapshot(root) == before
        assert "no owner" in answers[0].json()["error"] and "set-owner" in answers[0].json()["error"]
        # The administrator (who has the folder) hands the ownerless one over; then its owner may act.
        assert hub_main(["namespace", "set-owner", "legacy-team", "bob", "--root", str(root)]) == 0
        r = httpx.post(f"{server.url}/api/adapters/legacy-team/model/versions/1/yank", headers=auth(server, "bob"), json={})
        assert r.status_code == 200 and r.json()["yanked"] is True
    finally:
        server.stop()


# -- finding 4: a malicious hub cannot make the client write outside its cache -----------------------


class EvilHub(BaseHTTPRequestHandler):
    """Answers every info request with the record in ``self.server.record`` and every download with
    ``self.server.body``."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.endswith("/file"):
            body = self.server.body
        elif self.path.startswith("/api/adapters?") or self.path == "/api/adapters":
            body = json.dumps({"adapters": [self.server.record]}).encode()
        else:
            body = json.dumps(self.server.record).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def evil_hub() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), EvilHub)
    httpd.body = b"x" * 100
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_client_refuses_names_from_the_server_that_it_did_not_ask_for(evil_hub: ThreadingHTTPServer, tmp_path: Path) -> None:
    import hashlib

    sha = hashlib.sha256(evil_hub.body).hexdigest()
    good = {"namespace": "team", "name": "m", "version": "1", "sha256": sha, "size": 100, "created": 0.0}
    cache = tmp_path / "sandbox" / "cache"
    url = f"http://127.0.0.1:{evil_hub.server_address[1]}"
    hostile = [
        dict(good, namespace="../../../escaped"),
        dict(good, name="../../escaped"),
        dict(good, version="../../escaped"),
        dict(good, sha256="../../../../escaped" + "0" * 45),
        dict(good, name="other"),  # a valid name, but not the one asked for
        dict(good, version="2"),  # asked for @1
    ]
    for i, record in enumerate(hostile):
        evil_hub.record = record
        with RemoteRegistry(url, cache_dir=cache) as reg, pytest.raises(HubError, match="invalid adapter record"):
            reg.download("team/m@1")
        if i < 4:  # malformed in itself: refused in a search answer too
            with RemoteRegistry(url, cache_dir=cache) as reg, pytest.raises(HubError, match="invalid adapter record"):
                reg.search()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not any("escaped" in p for p in written), written
    assert all(p.startswith("sandbox") for p in written), written
    evil_hub.record = good  # the same hub answering honestly works
    with RemoteRegistry(url, cache_dir=cache) as reg:
        assert reg.download("team/m@1").read_bytes() == evil_hub.body


# -- finding 5: no 500s, no echo ---------------------------------------------------------------------


def test_lone_surrogates_and_huge_bodies_get_a_short_4xx(server: Server, real_artifact: Path) -> None:
    assert publish(server, real_artifact, "five/x").status_code == 201
    yank = f"{server.url}/api/adapters/five/x/versions/1/yank"
    headers = {**auth(server), "Content-Type": "application/json"}
    r = httpx.post(yank, content=b'{"reason": "\\ud800"}', headers=headers)
    assert r.status_code == 400 and "surrogate" in r.json()["error"], r.text
    big = json.dumps({"reason": "a" * (1 << 20)}).encode()
    r = httpx.post(yank, content=big, headers=headers)
    assert r.status_code == 413 and len(r.content) < 300, r.text[:300]

    def stream() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"reason": "'
        for _ in range(100):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(yank, content=stream(), headers=headers, timeout=60)
    assert r.status_code == 413 and len(r.content) < 300, r.text[:300]
    r = httpx.get(server.url + "/api/adapters?q=%ED%A0%80")  # the UTF-8 bytes of a lone surrogate
    assert r.status_code in (200, 400), r.text
    r = httpx.get(server.url + "/api/adapters", params={"limit": "x" * 10_000})
    assert r.status_code == 400 and len(r.content) < 1000, r.text[:300]
    assert httpx.get(server.url + "/health").status_code == 200


# -- hardening ---------------------------------------------------------------------------------------


def test_pages_send_protective_headers_and_downloads_answer_head(server: Server, real_artifact: Path) -> None:
    assert publish(server, real_artifact, "hdr/x").status_code == 201
    for path in ("/", "/adapters/hdr/x"):
        r = httpx.get(server.url + path)
        assert r.headers["x-content-type-options"] == "nosniff"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    api = httpx.get(server.url + "/api/adapters")
    assert api.headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in api.headers["content-security-policy"]
    url = server.url + "/api/adapters/hdr/x/versions/1/file"
    head = httpx.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == real_artifact.stat().st_size
    assert head.headers["etag"] == httpx.get(url).headers["etag"]


def test_versions_have_one_spelling(server: Server, real_artifact: Path) -> None:
    r = publish(server, real_artifact, "vers/x", version="1.0.0")
    assert r.status_code == 201 and r.json()["version"] == "1"
    assert publish(server, real_artifact, "vers/x", version="1").status_code == 409
    assert publish(server, real_artifact, "vers/x", version="1.0").status_code == 409
    for spelling in ("1", "1.0", "1.0.0"):
        assert httpx.get(f"{server.url}/api/adapters/vers/x/versions/{spelling}").json()["ref"] == "vers/x@1"


def test_metadata_over_the_size_cap_is_refused(server: Server, real_artifact: Path, tmp_path: Path) -> None:
    fat = rewrite(real_artifact, tmp_path / "fat.safetensors", lambda d: d.update(padding="p" * (300 << 10)))
    r = publish(server, fat, "fat/x")
    assert r.status_code == 422 and "metadata" in r.json()["error"], r.text


def test_cli_strips_control_characters_from_what_a_hub_sends(server: Server, real_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def hostile(doc: dict) -> None:
        doc["task"]["labels"] = ["neg\x1b[2J\x1b[31m", "pos\u202e"]
        doc["base"]["name_or_path"] = "bert\r\x1b]0;title\x07"

    art = rewrite(real_artifact, tmp_path / "ansi.safetensors", hostile)
    assert publish(server, art, "ansi/x").status_code == 201
    for argv in (["info", "ansi/x"], ["search", "ansi"]):
        assert hub_main([*argv, "--registry", server.url]) == 0
        out = capsys.readouterr().out
        assert "ansi/x@1" in out
        assert not any(ch in out for ch in "\x1b\r\x07\u202e"), repr(out)


# Last in this module: it blocks this client address on this module's server for a minute.
def test_failed_token_checks_are_rate_limited(server: Server) -> None:
    url = f"{server.url}/api/adapters/rl/x/versions/1"
    wrong = {"Authorization": "Bearer akt_000000000000_" + "A" * 43}
    statuses = [httpx.delete(url, headers=wrong).status_code for _ in range(12)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429], statuses
    r = httpx.delete(url, headers=auth(server))  # even a right token waits: the address is blocked
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
