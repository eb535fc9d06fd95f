"""The hub's index on PostgreSQL (psycopg 3), shared by any number of hub server processes.

    PostgresIndex("postgresql://hub:secret@db.internal:5432/adapterkit")

The registry's SQL is the same as on SQLite (``?`` placeholders are rewritten to ``%s``). The writer
lock is a transaction-scoped advisory lock (``pg_advisory_xact_lock``) taken as the first statement
of every write transaction: it serialises writers across processes the way ``BEGIN IMMEDIATE``
does on SQLite, and PostgreSQL releases it when the transaction ends — also when the process holding
it is SIGKILLed and its connection drops, so a crashed hub server never leaves the hub locked. Reads
need no lock (each statement sees committed data only). Connections come from a small pool.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import Conflict, Unavailable
from .index import Index, duplicate_message, insert_missing_meta

# Any fixed 64-bit number works; this one is "adapterkit" in ASCII, so it is recognisable in pg_locks.
WRITER_LOCK = 0x6164617074657273
POOL_MAX = 16
POOL_TIMEOUT = 60.0
_SQLITE_TYPES = ((re.compile(r"\bREAL\b"), "DOUBLE PRECISION"), (re.compile(r"\bINTEGER\b"), "BIGINT"))


class PgRow:
    """A row readable by column name and by position, like ``sqlite3.Row``."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]):
        self._names = names
        self._values = values

    def __getitem__(self, key: str | int) -> Any:
        return self._values[self._names[key] if isinstance(key, str) else key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)


def _row_factory(cursor: psycopg.Cursor) -> Any:
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(names, values)


def translate(sql: str) -> str:
    """The registry's SQLite-flavoured SQL as psycopg takes it (``?`` → ``%s``, ``%`` escaped)."""
    return sql.replace("%", "%%").replace("?", "%s")


def schema_for_postgres(schema: str) -> list[str]:
    """SQLite DDL to PostgreSQL statements: REAL is 4 bytes in PostgreSQL (timestamps would lose
    their seconds), INTEGER is 4 bytes (sizes over 2 GiB); both become 8-byte types."""
    for pattern, replacement in _SQLITE_TYPES:
        schema = pattern.sub(replacement, schema)
    return [s.strip() for s in schema.split(";") if s.strip()]


class _Connection:
    """A psycopg connection that takes the registry's SQL."""

    def __init__(self, conn: psycopg.Connection):
        self._conn = conn

    def execute(self, sql: str, args: tuple | list = ()) -> psycopg.Cursor:
        return self._conn.execute(translate(sql), tuple(args) if args else None)


class PostgresIndex(Index):
    """The index in a PostgreSQL database named by a libpq URL (``postgresql://user:pw@host:port/db``)."""

    def __init__(self, url: str, *, pool_size: int = POOL_MAX):
        self.url = url
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "row_factory": _row_factory},
            timeout=POOL_TIMEOUT,
            check=ConnectionPool.check_connection,  # a connection broken by a database restart is replaced
            open=False,
            name="adapterkit-hub",
        )
        try:
            self._pool.open(wait=True, timeout=POOL_TIMEOUT)
        except PoolTimeout as e:
            self._pool.close()
            raise Unavailable(f"cannot connect to the PostgreSQL index at {_redact(url)}: {e}") from None

    def __repr__(self) -> str:
        return f"PostgresIndex({_redact(self.url)!r})"

    def close(self) -> None:
        self._pool.close()

    def ensure_schema(self, schema: str, meta: dict[str, str]) -> None:
        # Under the writer lock: CREATE TABLE IF NOT EXISTS is not safe against itself in two
        # processes starting at once.
        with self.write() as db:
            for statement in schema_for_postgres(schema):
                db.execute(statement)
            insert_missing_meta(db, meta)

    @contextmanager
    def read(self) -> Iterator[_Connection]:
        with self._pool.connection() as conn:
            yield _Connection(conn)

    @contextmanager
    def write(self) -> Iterator[_Connection]:
        with self._pool.connection() as conn:
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
                    yield _Connection(conn)
            except psycopg.errors.UniqueViolation as e:
                raise Conflict(duplicate_message(e)) from None


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)

