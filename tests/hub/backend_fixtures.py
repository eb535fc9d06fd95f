"""Real PostgreSQL and SeaweedFS (S3) servers for the hub tests, started once per session on
loopback and stopped by PID (``adapterkit.hub.devservers``); each test gets a fresh database and a
fresh key prefix in one bucket.

Without PostgreSQL or the ``weed`` binary these tests are skipped locally, and fail under CI (``$CI``
set), where scripts/setup-hub-backends.sh must have installed them. They run in the transformers 5.x
environment only (nothing in them depends on transformers).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapterkit.hub.backends import open_backends
from adapterkit.hub.devservers import DevPostgres, DevSeaweedS3, DevServerError
from adapterkit.hub.registry import IndexedRegistry

BUCKET = "adapterkit-tests"
_counter = itertools.count()


def _once_per_ci_run() -> None:
    """The shared-backend suites exercise no transformers code: CI runs them in the transformers 5.x
    environment only (scripts/test.sh runs every test twice), which keeps its time down."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("PostgreSQL/S3 hub suites run once, in the transformers 5.x environment")


def _need(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        _unavailable(RuntimeError(f"{module} is not installed (pip install 'adapterkit[{extra}]')"))


def _unavailable(error: Exception) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"hub backend servers are required under CI: {error}")
    pytest.skip(f"hub backend servers unavailable: {error}")


@pytest.fixture(scope="session")
def dev_postgres() -> Iterator[DevPostgres]:
    _once_per_ci_run()
    _need("psycopg", "hub-cluster")
    try:
        pg = DevPostgres().start()
    except DevServerError as e:
        _unavailable(e)
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def dev_s3() -> Iterator[DevSeaweedS3]:
    _once_per_ci_run()
    _need("boto3", "hub-cluster")
    try:
        s3 = DevSeaweedS3().start()
    except DevServerError as e:
        _unavailable(e)
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())  # boto3 in this process, and every server subprocess, reads these
    try:
        s3.create_bucket(BUCKET)
        yield s3
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3.stop()


@dataclass(frozen=True)
class SharedBackends:
    """A fresh PostgreSQL database and S3 prefix: what ``hub serve --index … --blobs …`` takes."""

    index: str
    blobs: str
    env: dict[str, str]
    s3: DevSeaweedS3

    def open(self, work_dir: Path, reconcile: bool = True) -> IndexedRegistry:
        return open_backends(self.index, self.blobs, work_dir=work_dir, reconcile=reconcile)


@pytest.fixture()
def shared_backends(dev_postgres: DevPostgres, dev_s3: DevSeaweedS3) -> SharedBackends:
    n = next(_counter)
    name = f"t{os.getpid()}_{n}"
    return SharedBackends(dev_postgres.create_database(name), f"s3://{BUCKET}/{name}", dev_s3.env(), dev_s3)


@pytest.fixture()
def shared_registry(shared_backends: SharedBackends, tmp_path: Path) -> Iterator[IndexedRegistry]:
    reg = shared_backends.open(tmp_path / "s3-work")
    try:
        yield reg
    finally:
        reg.close()
