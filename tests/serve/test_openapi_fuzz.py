"""Schemathesis against the model server's OpenAPI schema (real MiniLM server on loopback): zero 5xx."""

from __future__ import annotations

import shutil

import pytest
from fuzz.openapi_fuzz import fuzz_openapi

from adapterkit.serve import ServeConfig, create_app

from .conftest import running


@pytest.fixture(scope="module")
def server(minilm, artifacts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-adapters")
    for name in ("sentiment", "ner", "broken"):
        shutil.copy(artifacts / f"{name}.safetensors", folder / f"{name}.safetensors")
    config = ServeConfig(base=str(minilm), registry=str(folder), max_wait_ms=1, max_length=64, max_new_tokens=8)
    with running(create_app(config)) as url:
        yield url


def test_no_5xx(server: str) -> None:
    counts = fuzz_openapi(server, examples=20)
    assert "POST /v1/classify" in counts and all(n > 0 for n in counts.values()), counts
