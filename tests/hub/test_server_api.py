"""The server's happy paths through RemoteRegistry, the HTTP API, the web page and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from hub_testing import Server, fingerprint, make_artifact, sha256

from adapterkit.hub import (
    Conflict,
    Forbidden,
    NotFound,
    RemoteRegistry,
    Unauthorized,
    Unavailable,
    resolve_reference,
)
from adapterkit.hub.cli import main as hub_main


@pytest.fixture()
def alice(hub_server: Server, tmp_path: Path):
    with RemoteRegistry(hub_server.url, hub_server.tokens["alice"], cache_dir=tmp_path / "cache") as reg:
        yield reg


def test_publish_search_info_download_through_the_client(alice: RemoteRegistry, hub_server: Server, tmp_path: Path) -> None:
    a = make_artifact(tmp_path / "a.safetensors", seed=31, description="spam or ham")
    b = make_artifact(tmp_path / "b.safetensors", seed=32)
    v1 = alice.publish(a, "api-team/sms-spam", metrics={"accuracy": 0.97}, base=fingerprint())
    v2 = alice.publish(b, "api-team/sms-spam", description="second")
    assert (v1.ref, v2.ref, v1.publisher) == ("api-team/sms-spam@1", "api-team/sms-spam@2", "alice")
    assert v1.sha256 == sha256(a) and v1.metrics == {"accuracy": 0.97} and v1.description == "spam or ham"
    # The server is shared by the whole session: look only at this test's namespace.
    assert [v.ref for v in alice.search("sms") if v.namespace == "api-team"] == ["api-team/sms-spam@2"]
    assert [v.adapter for v in alice.search(base_id=fingerprint()["id"], kind="houlsby") if v.namespace == "api-team"] == ["api-team/sms-spam"]
    assert alice.info("api-team/sms-spam").version == "2"
    assert [v.version for v in alice.versions("api-team/sms-spam")] == ["1", "2"]
    path = alice.download("api-team/sms-spam@1")
    assert path.read_bytes() == a.read_bytes() and path.is_relative_to(tmp_path / "cache")
    assert alice.download("api-team/sms-spam@latest").read_bytes() == b.read_bytes()
    alice.yank("api-team/sms-spam@2", reason="oops")
    assert alice.info("api-team/sms-spam").version == "1"
    with pytest.raises(Conflict, match="already exists"):
        alice.publish(a, "api-team/sms-spam@1")
    alice.delete("api-team/sms-spam@2")
    with pytest.raises(NotFound, match="was deleted"):
        alice.info("api-team/sms-spam@2")


def test_permissions_through_the_client(hub_server: Server, tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "a.safetensors", seed=41)
    with RemoteRegistry(hub_server.url, hub_server.tokens["alice"], cache_dir=tmp_path / "c1") as alice:
        alice.publish(art, "alices/x")
    with RemoteRegistry(hub_server.url, hub_server.tokens["bob"], cache_dir=tmp_path / "c2") as bob:
        with pytest.raises(Forbidden, match="belongs to 'alice'"):
            bob.publish(art, "alices/y")
        with pytest.raises(Forbidden):
            bob.yank("alices/x@1")
        assert bob.publish(art, "bobs/x").ref == "bobs/x@1"
    with RemoteRegistry(hub_server.url, cache_dir=tmp_path / "c3") as anonymous:
        assert anonymous.download("alices/x@1").read_bytes() == art.read_bytes()  # reads are anonymous
        with pytest.raises(Unauthorized, match="needs a token"):
            anonymous.publish(art, "anon/x")


def test_download_cache_verifies_and_works_offline(alice: RemoteRegistry, tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "a.safetensors", seed=51)
    alice.publish(art, "cache-team/x")
    path = alice.download("cache-team/x@1")
    # A cached file that rotted is not returned: it is fetched again.
    path.chmod(0o644)
    path.write_bytes(b"rotten")
    assert alice.download("cache-team/x@1").read_bytes() == art.read_bytes()
    # Exact versions resolve from the cache with the server gone; "latest" needs the server.
    with RemoteRegistry("http://127.0.0.1:9", cache_dir=alice.cache_dir) as offline:
        offline._ref_file = lambda ref: alice._ref_file(ref)  # same cache entries as the live server's
        assert offline.download("cache-team/x@1").read_bytes() == art.read_bytes()
        with pytest.raises(Unavailable, match="cannot reach the hub"):
            offline.download("cache-team/x@latest")


def test_http_api_etag_and_headers(hub_server: Server, alice: RemoteRegistry, tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "a.safetensors", seed=61)
    alice.publish(art, "etag-team/x")
    url = hub_server.url + "/api/adapters/etag-team/x/versions/1/file"
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == art.read_bytes()
    assert r.headers["etag"] == f'"{sha256(art)}"' and r.headers["x-content-sha256"] == sha256(art)
    assert "immutable" in r.headers["cache-control"]
    assert httpx.get(url, headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    latest = httpx.get(hub_server.url + "/api/adapters/etag-team/x/versions/latest/file")
    assert latest.content == art.read_bytes() and latest.headers["cache-control"] == "no-cache"
    doc = httpx.get(hub_server.url + "/api/adapters/etag-team/x").json()
    assert doc["adapter"]["ref"] == "etag-team/x@1" and len(doc["versions"]) == 1
    assert httpx.get(hub_server.url + "/openapi.json").json()["info"]["title"] == "adapterkit hub"
    assert httpx.get(hub_server.url + "/docs").status_code == 200


def test_resolve_reference_from_a_server(hub_server: Server, alice: RemoteRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = make_artifact(tmp_path / "a.safetensors", seed=71)
    alice.publish(art, "resolve-team/sms-spam")
    monkeypatch.setenv("ADAPTERKIT_REGISTRY", hub_server.url)
    monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path / "home"))
    path = resolve_reference("hub:resolve-team/sms-spam@1")
    assert path.read_bytes() == art.read_bytes() and path.is_relative_to(tmp_path / "home")
    assert resolve_reference("hub:resolve-team/sms-spam") == path


def test_web_pages(hub_server: Server, alice: RemoteRegistry, tmp_path: Path) -> None:
    alice.publish(make_artifact(tmp_path / "a.safetensors", seed=81, description="Finds <b>spam</b>"), "web-api/spam", metrics={"accuracy": 0.9})
    page = httpx.get(hub_server.url + "/", params={"q": "spam"}).text
    assert 'href="/adapters/web-api/spam"' in page and "accuracy=0.9" in page
    assert "<b>spam</b>" not in page and "&lt;b&gt;spam&lt;/b&gt;" in page  # escaped
    page = httpx.get(hub_server.url + "/adapters/web-api/spam").text
    assert "/api/adapters/web-api/spam/versions/1/file" in page
    assert "load_adapter(&#39;hub:web-api/spam@1&#39;)" in page and hub_server.url in page
    none = httpx.get(hub_server.url + "/", params={"q": "zzzz-nothing"}).text
    assert "No adapters found" in none
    r = httpx.get(hub_server.url + "/adapters/web-api/nope")
    assert r.status_code == 404 and "no adapter" in r.json()["error"]


def test_cli_against_the_server(hub_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path / "home"))
    art = make_artifact(tmp_path / "a.safetensors", seed=91)
    reg = ["--registry", hub_server.url]
    token = ["--token", hub_server.tokens["alice"]]
    assert hub_main(["push", str(art), "cli-team/spam", *reg, *token, "--metrics", '{"f1": 0.8}', "--description", "cli"]) == 0
    assert "published cli-team/spam@1" in capsys.readouterr().out
    assert hub_main(["search", "cli", *reg]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["ADAPTER", "BASE", "MODEL", "TASK", "KIND/R", "SIZE", "METRICS"]
    assert "cli-team/spam@1" in out and "f1=0.8" in out
    assert hub_main(["info", "cli-team/spam", *reg]) == 0
    assert sha256(art) in capsys.readouterr().out
    assert hub_main(["pull", "cli-team/spam@1", *reg, "-o", str(tmp_path)]) == 0
    assert (tmp_path / "cli-team-spam-1.safetensors").read_bytes() == art.read_bytes()
    assert hub_main(["info", "cli-team/spam", *reg, "--json"]) == 0
    capsys.readouterr()
    assert hub_main(["yank", "cli-team/spam@1", *reg, *token, "--reason", "test"]) == 0
    assert "yanked cli-team/spam@1" in capsys.readouterr().out
    # Errors: one line, exit code 1.
    for argv, why in (
        (["push", str(art), "cli-team/spam@1", *reg, *token], "already exists"),
        (["push", str(art), "cli-team/x", *reg], "needs a token"),
        (["push", str(tmp_path / "nope.safetensors"), "cli-team/x", *reg, *token], "no such file"),
        (["push", str(art), "cli-team/x", *reg, *token, "--metrics", "{bad"], "Expecting property name"),
        (["pull", "cli-team/nope", *reg], "no adapter"),
        (["info", "../etc", *reg], "contains '..'"),
        (["info", "team/a/b", *reg], "exactly one '/'"),
        (["search", "--registry", "http://127.0.0.1:9"], "cannot reach the hub"),
    ):
        assert hub_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err


def test_cli_local_registry_and_tokens(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path / "reg")
    art = make_artifact(tmp_path / "a.safetensors", seed=101)
    assert hub_main(["push", str(art), "loc/x", "--registry", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ref"] == "loc/x@1"
    assert hub_main(["pull", "loc/x", "--registry", root]) == 0
    assert Path(capsys.readouterr().out.strip()).read_bytes() == art.read_bytes()
    assert hub_main(["search", "--registry", root, "--kind", "pfeiffer"]) == 0
    assert "no adapters found" in capsys.readouterr().out
    assert hub_main(["token", "create", "dora", "--root", root]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("akt_")
    assert hub_main(["token", "list", "--root", root]) == 0
    listing = capsys.readouterr().out
    assert "dora" in listing and "active" in listing and token not in listing
    assert hub_main(["token", "revoke", token, "--root", root]) == 0
    assert hub_main(["token", "list", "--root", root]) == 0
    assert "revoked" in capsys.readouterr().out
    assert hub_main(["token", "revoke", "ffffffffffff", "--root", root]) == 1
    assert "no token" in capsys.readouterr().err


def test_top_level_cli_has_the_hub_command() -> None:
    from adapterkit.cli import build_parser

    args = build_parser().parse_args(["hub", "search", "spam", "--registry", "/tmp/x"])
    assert callable(args.func) and args.text == "spam"
