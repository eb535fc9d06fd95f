"""Choosing a hub's index and blob store by URL.

    open_backends("postgresql://hub@db:5432/adapterkit", "s3://adapters/hub")   # a team's hub
    open_backends("/srv/hub/index.db", "/srv/hub")                             # = LocalRegistry layout

- index: ``postgresql://…`` / ``postgres://…`` (libpq URL: user, password, host, port, database,
  ``?sslmode=…``) -> ``PostgresIndex``; ``sqlite:///path/index.db`` or a plain path -> ``SqliteIndex``.
- blobs: ``s3://bucket/prefix`` -> ``S3BlobStore`` (endpoint and credentials from the usual AWS
  environment variables: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION``, or ``~/.aws``); ``file:///path`` or a plain path -> a blob folder.

psycopg and boto3 are imported only when a URL needs them (``pip install 'adapterkit[hub-cluster]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BadRequest
from .index import Index, SqliteIndex
from .registry import IndexedRegistry, LocalRegistry, default_home
from .store import BlobBackend, BlobStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _missing(package: str, extra: str = "hub-cluster") -> BadRequest:
    return BadRequest(f"this backend needs {package}: pip install 'adapterkit[{extra}]'")


def is_remote_index(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def open_index(url: str) -> Index:
    """An index from a URL or a path (see the module docstring)."""
    if is_remote_index(url):
        try:
            from .index_postgres import PostgresIndex
        except ImportError:
            raise _missing("psycopg") from None
        return PostgresIndex(url)
    if "://" in url and not url.startswith("sqlite://"):
        raise BadRequest(f"index URL {url!r}: use postgresql://…, sqlite:///path/index.db or a file path")
    path = Path(url.removeprefix("sqlite://")).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteIndex(path)


def open_blobs(url: str, work_dir: str | os.PathLike | None = None) -> BlobBackend:
    """A blob store from a URL or a path. ``work_dir``: local spool and read cache of a remote store
    (default ``$ADAPTERKIT_HOME/s3``)."""
    if url.startswith("s3://"):
        try:
            from .blobs_s3 import S3BlobStore
        except ImportError:
            raise _missing("boto3") from None
        return S3BlobStore(url, work_dir if work_dir is not None else default_home() / "s3")
    if "://" in url and not url.startswith("file://"):
        raise BadRequest(f"blob store URL {url!r}: use s3://bucket/prefix, file:///path or a folder path")
    return BlobStore(Path(url.removeprefix("file://")).expanduser())


def open_backends(
    index: str | None = None,
    blobs: str | None = None,
    *,
    root: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    reconcile: bool = True,
) -> IndexedRegistry:
    """A registry over the index and blob store named by URL; with neither, the ``LocalRegistry``
    at ``root`` (default ``$ADAPTERKIT_HOME``). Both URLs, or ``root`` alone."""
    if index is None and blobs is None:
        return LocalRegistry(root, reconcile=reconcile)
    if index is None or blobs is None:
        raise BadRequest("give both --index and --blobs (or only --root for a local registry)")
    if root is not None:
        raise BadRequest("--root names a local registry; it cannot be combined with --index/--blobs")
    idx = open_index(index)
    try:
        store = open_blobs(blobs, work_dir)
    except BaseException:
        idx.close()
        raise
    return IndexedRegistry(idx, store, reconcile=reconcile)
