"""The hub server's suite again, on a server started with ``--index postgresql://… --blobs s3://…``:
the client, the HTTP API, the web pages, the CLI, and every bad input refused with nothing stored
(the snapshot reads PostgreSQL and the bucket)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from backend_fixtures import SharedBackends
from hub_testing import Server, create_tokens

# Collected here a second time, with `hub_server` below.
from test_bad_inputs import (  # noqa: F401
    ctx,
    test_bad_input_is_refused_and_nothing_is_stored,
    test_good_file_still_publishes_after_all_that,
    test_upload_cut_off_by_the_client_stores_nothing,
)
from test_server_api import (  # noqa: F401
    alice,
    test_cli_against_the_server,
    test_download_cache_verifies_and_works_offline,
    test_http_api_etag_and_headers,
    test_permissions_through_the_client,
    test_publish_search_info_download_through_the_client,
    test_web_pages,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_backends(dev_postgres, dev_s3, tmp_path_factory: pytest.TempPathFactory) -> SharedBackends:
    name = f"server_{tmp_path_factory.mktemp('n').name.replace('-', '_')}"
    return SharedBackends(dev_postgres.create_database(name), f"s3://adapterkit-tests/{name}", dev_s3.env(), dev_s3)


@pytest.fixture(scope="module")
def hub_server(module_backends: SharedBackends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("pg-s3-server")
    reg = module_backends.open(tmp / "setup")
    try:
        tokens = create_tokens(reg)
    finally:
        reg.close()
    server = Server(tmp / "root", index=module_backends.index, blobs=module_backends.blobs, env=module_backends.env)
    server.tokens = tokens
    server.start()
    try:
        yield server
    finally:
        server.stop()
