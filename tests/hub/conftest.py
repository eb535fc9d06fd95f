"""Fixtures for the hub tests (the shared code is in hub_testing.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_testing import Server, create_tokens, make_artifact

from adapterkit.hub.registry import LocalRegistry


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hub-server") / "root"
    tokens = create_tokens(root)
    server = Server(root)
    server.tokens = tokens
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def registry(tmp_path: Path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


@pytest.fixture()
def artifact(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "sentiment.safetensors")


# PostgreSQL and S3 servers (session-scoped, so defined here once for every hub test module).
from backend_fixtures import dev_postgres, dev_s3, shared_backends, shared_registry  # noqa: E402, F401
