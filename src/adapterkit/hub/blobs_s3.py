"""Blobs on S3-compatible object storage (boto3): ``s3://bucket/prefix`` holds ``prefix/blobs/ab/cdef…``.

    S3BlobStore("s3://adapters/hub")   # endpoint and keys: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...

Any S3 implementation works (AWS, MinIO, SeaweedFS, Ceph RGW, R2): the calls are PutObject,
HeadObject, GetObject, DeleteObject and ListObjectsV2, configured the way every AWS tool is (the
environment, ``~/.aws/config``, an instance role).

- An upload is spooled to a local temp file (hashed, validated by the registry), then sent in **one
  PutObject** carrying its SHA-256 checksum: the store refuses bytes that do not hash to it, and a
  single PUT is atomic, so an object under a blob key is always complete. HeadObject then confirms
  the size before the registry commits the index row.
- Reads go through a local cache folder named by sha256 (files written by a verified download, then
  renamed into place, read-only), so a hub server sends a blob from local disk after its first read.
- Temp files carry the same ``flock`` liveness mark as the folder store's, so several hub processes
  on one machine may share the spool folder.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import BadRequest, IntegrityError, Unavailable
from .store import CHUNK, SHA256_HEX, BlobBackend, Upload, fsync_dir

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix"); the prefix may be empty."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise BadRequest(f"blob store URL must look like s3://bucket/prefix, got {url!r}")
    if not _BUCKET_RE.match(parsed.netloc):
        raise BadRequest(f"{parsed.netloc!r} is not a valid S3 bucket name")
    prefix = parsed.path.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise BadRequest(f"S3 prefix {prefix!r} has empty, '.' or '..' parts")
    return parsed.netloc, prefix


class S3BlobStore(BlobBackend):
    """Blobs in an S3 bucket under a prefix; ``work_dir`` holds the spool and the read cache."""

    def __init__(self, url: str, work_dir: str | os.PathLike, *, client: Any = None):
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        if client is None:
            import boto3

            client = boto3.client("s3")  # AWS_ENDPOINT_URL and the usual credential chain
        self.client = client
        root = Path(work_dir).expanduser()
        self.tmp_dir = root / "tmp"
        # One cache per bucket and prefix: the same sha256 is the same bytes anywhere, but a cache
        # shared between stores would hide a blob missing from one of them.
        self.cache_dir = root / "cache" / hashlib.sha256(url.encode()).hexdigest()[:16]
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._keys_prefix = f"{self.prefix}/blobs/" if self.prefix else "blobs/"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise Unavailable(f"cannot use the S3 bucket {self.bucket!r}: {_describe(e)}") from None

    def __repr__(self) -> str:
        return f"S3BlobStore({self.url!r})"

    def key_for(self, sha256: str) -> str:
        return f"{self._keys_prefix}{sha256[:2]}/{sha256[2:]}"

    def _cache_path(self, sha256: str) -> Path:
        return self.cache_dir / sha256[:2] / sha256[2:]

    # -- writing ------------------------------------------------------------------------------

    def adopt(self, upload: Upload) -> None:
        sha = upload.finish()
        key = self.key_for(sha)
        checksum = base64.b64encode(bytes.fromhex(sha)).decode()
        with open(upload.path, "rb") as body:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentLength=upload.size, ChecksumSHA256=checksum,
                ContentType="application/octet-stream",
            )
        head = self.client.head_object(Bucket=self.bucket, Key=key)
        if head["ContentLength"] != upload.size:
            raise IntegrityError(f"S3 stored {head['ContentLength']} bytes for blob {sha[:12]}…, {upload.size} were sent")
        # The spooled file is verified bytes: keep it as the first cached copy.
        self._into_cache(upload.path, sha)
        upload.adopted = True
        upload.discard()

    def _into_cache(self, path: Path, sha256: str) -> Path:
        dest = self._cache_path(sha256)
        dest.parent.mkdir(exist_ok=True)
        os.chmod(path, 0o444)
        os.replace(path, dest)
        fsync_dir(dest.parent)
        return dest

    def remove(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key_for(sha256))
        self._cache_path(sha256).unlink(missing_ok=True)

    # -- reading ------------------------------------------------------------------------------

    def all_blobs(self) -> dict[str, str]:
        """Every stored blob: sha256 -> object key."""
        return {sha: self.key_for(sha) for sha in self.sizes()}

    def sizes(self) -> dict[str, int]:
        found: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._keys_prefix)
        for page in pages:
            for obj in page.get("Contents", ()):
                rest = obj["Key"][len(self._keys_prefix):]
                sha = rest.replace("/", "")
                if len(rest) == SHA256_HEX + 1 and rest[2] == "/" and re.fullmatch(r"[0-9a-f]{64}", sha):
                    found[sha] = obj["Size"]
        return found

    def _fetch(self, sha256: str) -> tuple[Upload, str] | None:
        """Download a blob into a spool file, hashing it; None when there is no such object."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key_for(sha256))
        except self.client.exceptions.NoSuchKey:
            return None
        upload = Upload(self.tmp_dir)
        try:
            for chunk in response["Body"].iter_chunks(CHUNK):
                upload.write(chunk)
            return upload, upload.finish()
        except BaseException:
            upload.discard()
            raise

    def hash_of(self, sha256: str) -> str:
        fetched = self._fetch(sha256)
        if fetched is None:
            return ""
        upload, actual = fetched
        upload.discard()
        return actual

    def local_path(self, sha256: str) -> Path | None:
        cached = self._cache_path(sha256)
        if cached.is_file():
            return cached
        fetched = self._fetch(sha256)
        if fetched is None:
            return None
        upload, actual = fetched
        with upload:
            if actual != sha256:
                raise IntegrityError(f"blob {sha256[:12]}… in S3 is corrupt (its bytes hash to {actual[:12]}…)")
            dest = self._into_cache(upload.path, sha256)
            upload.adopted = True
        return dest

    def clear_cache(self) -> int:
        """Remove every cached copy (they are refetched on demand); return how many."""
        removed = 0
        for path in self.cache_dir.glob("*/*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


def _describe(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        return f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()
    return f"{type(error).__name__}: {error}"
