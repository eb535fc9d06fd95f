"""Crash-safe file writes: every file adapterkit writes whole goes through here.

The one exception: the hub's streamed blob writes (``hub/store.py``, ``hub/client.py``,
``hub/blobs_s3.py``), which verify a sha256 while the bytes arrive, follow the same steps inline.

A write fills a temp file beside the target, fsyncs it, renames it over the target and fsyncs the
folder, so a crash at any point leaves the old file or the new one, never a partial one. Files get the
permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask), not ``mkstemp``'s 0600:
an artifact, a log and a checkpoint written by one run are all readable alike.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temp file beside ``path``, then fsync, rename over ``path``.

    ``write`` receives the temp file's path (so library writers such as ``safetensors.save_file`` or
    ``matplotlib`` can write it by name). On any exception the temp file is removed and ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        final_mode = _default_mode() if mode is None else mode
        os.fchmod(fd, final_mode)
        os.close(fd)
        write(tmp)
        # again: a writer may replace the file rather than fill it (safetensors' save_file does,
        # leaving 0600), and every file adapterkit writes must read alike
        os.chmod(tmp, final_mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """``atomic_write`` for a bytes payload."""
    return atomic_write(path, lambda p: p.write_bytes(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """``atomic_write`` for text (UTF-8)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), mode)
