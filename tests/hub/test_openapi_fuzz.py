"""Schemathesis against the hub server's OpenAPI schema (a real server on loopback): zero 5xx,
anonymous and with a token, on a registry that holds an adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz.openapi_fuzz import fuzz_openapi
from hub_testing import Server, create_tokens, make_artifact

from adapterkit.hub import LocalRegistry


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz-hub") / "root"
    LocalRegistry(root).publish(make_artifact(root.parent / "a.safetensors"), "team/sms-spam")
    srv = Server(root, max_upload_mb=1)
    srv.tokens = create_tokens(root, owners=("alice",))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_no_5xx_anonymous(server: Server) -> None:
    counts = fuzz_openapi(server.url, examples=20)
    assert "GET /api/adapters" in counts and all(n > 0 for n in counts.values()), counts


def test_no_5xx_with_a_token(server: Server, tmp_path: Path) -> None:
    # Writes with a valid token (the failed-auth limit never sees a wrong token here).
    counts = fuzz_openapi(server.url, examples=15, headers={"Authorization": f"Bearer {server.tokens['alice']}"},
                          skip=lambda method, path: method == "GET")
    assert any(label.startswith("POST") for label in counts), counts
