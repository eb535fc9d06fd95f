"""Blob stores: the interface (``BlobBackend``) and the folder one, ``blobs/ab/cdef…`` named by the
sha256 of the bytes (the S3 one is ``blobs_s3.S3BlobStore``).

Bytes arrive in a temp file under ``tmp/`` (hashed as they are written), are fsynced, and only then
renamed into ``blobs/``; a rename is atomic, so a blob path either does not exist or holds the whole,
fsynced file. A writer holds an ``flock`` on its temp file for as long as it lives, so a later process
can tell a temp file left by a crash (lock free) from one still being written (lock held).
"""

from __future__ import annotations

import abc
import hashlib
import os
import tempfile
import time
from pathlib import Path

try:  # POSIX; elsewhere stale temp files are recognised by age instead
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

CHUNK = 1 << 20
SHA256_HEX = 64
# Without flock, a temp file this old is taken to be left by a crash.
STALE_TEMP_SECONDS = 24 * 3600


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """The sha256 (hex) and size of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Upload:
    """A temp file being filled: ``write`` chunks, ``finish`` to fsync and get the sha256.

    Either ``BlobStore.adopt`` moves it into the store or ``discard`` removes it; use it as a context
    manager so that an exception always discards it.
    """

    def __init__(self, tmp_dir: Path):
        fd, name = tempfile.mkstemp(prefix="up-", suffix=".part", dir=tmp_dir)
        # The lock says "alive" to any process reconciling the store; it dies with this process.
        # (A reconcile landing between mkstemp and flock could take an empty new file for dead; the
        # window is a few microseconds and reconcile runs only when a registry is opened.)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.sha256: str | None = None
        self.adopted = False

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> str:
        """Flush and fsync; return the sha256 hex of everything written."""
        if self.sha256 is None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self.sha256 = self._hash.hexdigest()
        return self.sha256

    def discard(self) -> None:
        """Remove the temp file unless it was adopted; safe to call more than once."""
        if not self._file.closed:
            self._file.close()
        if not self.adopted:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class BlobBackend(abc.ABC):
    """Where a registry keeps artifact bytes, named by their sha256.

    Uploads are always spooled to a local temp file first (``upload()``: hashed while written,
    validated by the registry), and ``adopt`` makes one a blob in a single step that is all or
    nothing; the registry calls it inside its index's write transaction, so a blob without an index
    row exists only after a crash, and ``reconcile`` removes it.
    """

    tmp_dir: Path

    def upload(self) -> Upload:
        return Upload(self.tmp_dir)

    @abc.abstractmethod
    def adopt(self, upload: Upload) -> None:
        """Store a finished upload as the blob named by its sha256 (a no-op for bytes already stored)."""

    @abc.abstractmethod
    def remove(self, sha256: str) -> None:
        """Delete a blob (missing is fine)."""

    @abc.abstractmethod
    def sizes(self) -> dict[str, int]:
        """Every stored blob: sha256 -> size in bytes."""

    @abc.abstractmethod
    def hash_of(self, sha256: str) -> str:
        """The sha256 of the stored bytes, read back in full (for deep checks and migration)."""

    @abc.abstractmethod
    def local_path(self, sha256: str) -> Path | None:
        """A local file holding the blob (fetched into a cache for remote stores, verified on the
        way), or None when the store has no such blob."""

    def temp_files(self) -> list[Path]:
        return [p for p in self.tmp_dir.iterdir() if p.is_file()]

    def remove_stale_temps(self) -> int:
        """Delete temp files whose writer is gone; return how many."""
        removed = 0
        for path in self.temp_files():
            if _is_stale(path):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def close(self) -> None:
        """Release clients and connections."""
        return None  # nothing to release by default


class BlobStore(BlobBackend):
    """Blobs under ``root/blobs`` named by sha256, temp files under ``root/tmp``."""

    def __init__(self, root: Path):
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.blob_dir.parent)!r})"

    def path_for(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256[2:]

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def adopt(self, upload: Upload) -> Path:
        """Move a finished upload into the store (atomic rename); returns the blob path.

        If the blob already exists (same bytes published before) the temp file is simply dropped.
        """
        sha = upload.finish()
        dest = self.path_for(sha)
        if dest.is_file():
            upload.discard()
            return dest
        dest.parent.mkdir(exist_ok=True)
        os.chmod(upload.path, 0o444)  # blobs are immutable; make accidental edits fail
        os.replace(upload.path, dest)
        upload.adopted = True
        upload.discard()
        fsync_dir(dest.parent)
        return dest

    def remove(self, sha256: str) -> None:
        path = self.path_for(sha256)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def all_blobs(self) -> dict[str, Path]:
        """Every blob on disk, by sha256 (files with names that are not sha256 are ignored)."""
        found: dict[str, Path] = {}
        for sub in self.blob_dir.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sub.iterdir():
                sha = sub.name + f.name
                if len(sha) == SHA256_HEX and f.is_file():
                    found[sha] = f
        return found

    def sizes(self) -> dict[str, int]:
        return {sha: path.stat().st_size for sha, path in self.all_blobs().items()}

    def hash_of(self, sha256: str) -> str:
        return sha256_file(self.path_for(sha256))[0]

    def local_path(self, sha256: str) -> Path | None:
        path = self.path_for(sha256)
        return path if path.is_file() else None


def _is_stale(path: Path) -> bool:
    if fcntl is None:  # pragma: no cover
        try:
            return time.time() - path.stat().st_mtime > STALE_TEMP_SECONDS
        except FileNotFoundError:
            return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live writer holds it
    finally:
        os.close(fd)  # closing drops our lock too
    return True
