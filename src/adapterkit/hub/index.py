"""Where the hub keeps its index: the interface, and the embedded SQLite implementation.

The registry's SQL is written once, in the subset SQLite and PostgreSQL share (``?`` placeholders,
plain ``SELECT``/``INSERT``/``UPDATE``); an ``Index`` hands out connections that run it:

- ``read()``: a connection for reads (no transaction held open longer than each statement needs);
- ``write()``: one transaction that holds the index's **single writer lock** from its first statement
  to its commit. Every publish, yank, delete, token change and reconcile runs inside one, so they are
  serialised across threads and processes: that is what makes "exactly one of two racing publishers of
  ``name@version`` wins" and "reconcile sees every blob with its committed row" true. The primary key
  on ``(namespace, name, version)`` guards the first rule a second time.

Rows answer both ``row["column"]`` and ``row[0]``. ``SqliteIndex`` is the default (a file beside the
blobs); ``adapterkit.hub.index_postgres.PostgresIndex`` is the one several hub servers share.
"""

from __future__ import annotations

import abc
import os
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from .errors import Conflict


class Row(Protocol):
    def __getitem__(self, key: str | int) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...

    def __iter__(self) -> Iterator[Row]: ...


class Connection(Protocol):
    def execute(self, sql: str, args: tuple | list = ()) -> Cursor: ...


class Index(abc.ABC):
    """A SQL database holding the hub's tables (see ``registry._SCHEMA``)."""

    #: a short name for messages and ``repr``
    url: str

    @abc.abstractmethod
    def ensure_schema(self, schema: str, meta: dict[str, str]) -> None:
        """Create the tables if missing (``schema``: SQLite DDL, statements separated by ``;``) and
        set the ``meta`` keys that are not set yet; safe when several processes start at once."""

    @abc.abstractmethod
    def read(self) -> AbstractContextManager[Connection]:
        """A connection for reads."""

    @abc.abstractmethod
    def write(self) -> AbstractContextManager[Connection]:
        """A transaction holding the writer lock; committed on normal exit, rolled back on error."""

    def close(self) -> None:
        """Release connections (a no-op where there are none to keep)."""
        return None  # nothing to release by default


def insert_missing_meta(db: Connection, meta: dict[str, str]) -> None:
    for key, value in meta.items():
        if db.execute("SELECT 1 FROM meta WHERE key = ?", (key,)).fetchone() is None:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))


def duplicate_message(error: Exception) -> str:
    return f"that entry already exists (a concurrent request won): {error}"


class SqliteIndex(Index):
    """``index.db`` in WAL mode; ``BEGIN IMMEDIATE`` is the writer lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.url = str(self.path)

    def __repr__(self) -> str:
        return f"SqliteIndex({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        # A connection per operation: cheap in SQLite, and never shared across threads.
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=60000")
        db.execute("PRAGMA synchronous=FULL")  # a reported publish survives power loss too
        return db

    def ensure_schema(self, schema: str, meta: dict[str, str]) -> None:
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a publish
            db.executescript(schema)
        finally:
            db.close()
        with self.write() as db:
            insert_missing_meta(db, meta)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except sqlite3.IntegrityError as e:
                db.execute("ROLLBACK")
                if "UNIQUE" not in str(e):
                    raise
                raise Conflict(duplicate_message(e)) from None
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()
