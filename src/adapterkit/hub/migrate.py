"""Copy one registry into another — typically a local hub folder into PostgreSQL + S3:

    adapterkit hub migrate --from /srv/hub --to postgresql://hub@db/adapterkit --blobs s3://adapters/hub

Everything moves: every version row as it is (yanked and deleted ones too, so deleted numbers stay
taken), namespace owners, and tokens (their hashes; the tokens people hold keep working). Each blob is
hashed at the source before it is sent and read back from the destination and hashed again after;
a mismatch stops the migration. A version is written (blob, then row) in one destination write
transaction, so an interrupted migration leaves only whole versions, and running it again copies
what is left: rows already there with the same sha256 are skipped, a row there with other bytes is a
conflict and stops it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import Conflict, IntegrityError
from .registry import IndexedRegistry
from .store import CHUNK


@dataclass
class MigrationReport:
    versions_copied: int = 0
    versions_present: int = 0
    blobs_copied: int = 0
    bytes_copied: int = 0
    namespaces_copied: int = 0
    tokens_copied: int = 0
    problems: list[str] = field(default_factory=list)


def _columns(row) -> list[str]:
    return list(row.keys())


def _insert(db, table: str, row) -> None:
    cols = _columns(row)
    db.execute(
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
        tuple(row[c] for c in cols),
    )


def migrate(
    source: IndexedRegistry, dest: IndexedRegistry, *, log: Callable[[str], None] | None = None
) -> MigrationReport:
    """Copy ``source`` into ``dest`` (see the module docstring); returns what was done."""
    say = log or (lambda _msg: None)
    report = MigrationReport()
    problems = source.check(deep=False)
    if problems:
        # Refuse to copy an inconsistent source: reconcile it first (opening it does that).
        raise IntegrityError("the source registry is inconsistent; reconcile it first: " + "; ".join(problems[:5]))
    with source._read() as db:
        versions = db.execute("SELECT * FROM versions ORDER BY namespace, name, created").fetchall()
        namespaces = db.execute("SELECT * FROM namespaces").fetchall()
        tokens = db.execute("SELECT * FROM tokens").fetchall()

    with dest._write() as db:
        for ns in namespaces:
            row = db.execute("SELECT owner FROM namespaces WHERE name = ?", (ns["name"],)).fetchone()
            if row is None:
                _insert(db, "namespaces", ns)
                report.namespaces_copied += 1
            elif row["owner"] != ns["owner"]:
                raise Conflict(f"namespace {ns['name']!r} belongs to {row['owner']!r} at the destination, {ns['owner']!r} at the source")
        for tok in tokens:
            row = db.execute("SELECT hash FROM tokens WHERE id = ?", (tok["id"],)).fetchone()
            if row is None:
                _insert(db, "tokens", tok)
                report.tokens_copied += 1
            elif row["hash"] != tok["hash"]:
                raise Conflict(f"token id {tok['id']} exists at the destination with another secret")

    stored = dest.blobs.sizes()
    for v in versions:
        ref = f"{v['namespace']}/{v['name']}@{v['version']}"
        with dest._read() as db:
            there = db.execute(
                "SELECT sha256 FROM versions WHERE namespace=? AND name=? AND version=?", (v["namespace"], v["name"], v["version"])
            ).fetchone()
        if there is not None:
            if there["sha256"] != v["sha256"]:
                raise Conflict(f"{ref} exists at the destination with other bytes (sha256 {there['sha256'][:12]}…)")
            report.versions_present += 1
            continue
        needs_blob = not v["deleted"] and not v["missing"] and v["sha256"] not in stored
        upload = None
        if needs_blob:
            path = source.blobs.local_path(v["sha256"])
            if path is None:
                raise IntegrityError(f"{ref}: the source has no blob {v['sha256'][:12]}…")
            upload = dest.blobs.upload()
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    upload.write(chunk)
            if upload.finish() != v["sha256"]:
                upload.discard()
                raise IntegrityError(f"{ref}: the source blob does not hash to {v['sha256'][:12]}…")
        try:
            with dest._write() as db:
                if upload is not None:
                    dest.blobs.adopt(upload)
                    actual = dest.blobs.hash_of(v["sha256"])
                    if actual != v["sha256"]:
                        raise IntegrityError(f"{ref}: the copy at the destination hashes to {actual[:12]}…, not {v['sha256'][:12]}…")
                _insert(db, "versions", v)
        finally:
            if upload is not None:
                upload.discard()
        if upload is not None:
            stored[v["sha256"]] = upload.size
            report.blobs_copied += 1
            report.bytes_copied += upload.size
        report.versions_copied += 1
        say(f"copied {ref}")
    report.problems = dest.check(deep=False)
    return report
