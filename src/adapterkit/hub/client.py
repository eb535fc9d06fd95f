"""``RemoteRegistry``: the registry interface over HTTP, for a hub server.

Downloads land in a local cache keyed by sha256 (``<cache>/blobs/ab/cdef…``) and are verified
before they are returned. Exact versions are immutable, so the sha256 of each one is remembered too
(``<cache>/refs/<server>/<namespace>/<name>/<version>``): a cached ``team/name@1`` resolves with the
server unreachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .. import __version__
from ..artifact import ArtifactError, read_metadata
from .errors import BadRequest, HubError, IntegrityError, InvalidArtifact, Unavailable, error_for_status
from .names import LATEST, Ref, parse_ref, validate_version
from .registry import AdapterVersion, Registry, default_home
from .store import CHUNK, fsync_dir, sha256_file

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Transfers smaller than this get no progress bar.
PROGRESS_MIN_BYTES = 8 << 20


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    if not enabled or (total is not None and total < PROGRESS_MIN_BYTES):
        return None
    from tqdm import tqdm

    # disable=None: the bar shows on a terminal only, never in logs.
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None, leave=False)


class RemoteRegistry(Registry):
    """A hub server at ``url``; ``token`` is needed to publish, yank and delete."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        timeout: float = 120.0,
        progress: bool = False,
    ):
        if not re.match(r"^https?://", url):
            raise ValueError(f"hub URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.progress = progress
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_home() / "remote-cache"
        headers = {"User-Agent": f"adapterkit/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, follow_redirects=False)

    def __repr__(self) -> str:
        return f"RemoteRegistry({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise Unavailable(f"cannot reach the hub at {self.url}: {e or type(e).__name__}") from None
        _raise_for_error(response)
        return response

    @staticmethod
    def _path(ref: Ref) -> str:
        return f"/api/adapters/{ref.namespace}/{ref.name}"

    # -- the interface ------------------------------------------------------------------------

    def publish(
        self,
        path: str | os.PathLike,
        ref: str,
        version: str | None = None,
        description: str | None = None,
        metrics: dict[str, Any] | None = None,
        *,
        base: dict[str, Any] | str | None = None,
    ) -> AdapterVersion:
        target = parse_ref(ref, allow_latest=False)
        if version is not None:
            version = validate_version(version, allow_latest=False)
            if target.version is not None and target.version != version:
                raise BadRequest(f"two versions given: {target.version!r} in the reference and {version!r}")
        version = version or target.version
        path = Path(path)
        try:  # fail here, before uploading megabytes, on a file that is clearly wrong
            read_metadata(path)
        except FileNotFoundError:
            raise InvalidArtifact(f"{path}: no such file") from None
        except ArtifactError as e:
            raise InvalidArtifact(str(e)) from None
        sha, size = sha256_file(path)
        params: dict[str, str] = {}
        if version:
            params["version"] = version
        if description:
            params["description"] = description
        if metrics:
            params["metrics"] = json.dumps(metrics)
        if base:
            params["base"] = base if isinstance(base, str) else json.dumps(base)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            # Lets the server tell a transfer cut short from a file that was bad to begin with.
            "X-Content-SHA256": sha,
        }
        response = self._request(
            "POST", self._path(target) + "/versions", params=params, headers=headers, content=self._read_chunks(path, size)
        )
        return AdapterVersion.from_dict(response.json())

    def _read_chunks(self, path: Path, size: int) -> Iterator[bytes]:
        bar = _progress(size, f"push {path.name}", self.progress)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                if bar is not None:
                    bar.update(len(chunk))
                yield chunk
        if bar is not None:
            bar.close()

    def search(
        self,
        text: str | None = None,
        *,
        base_id: str | None = None,
        model_type: str | None = None,
        task_type: str | None = None,
        kind: str | None = None,
        name_or_path: str | None = None,
        limit: int = 100,
    ) -> list[AdapterVersion]:
        params = {
            k: v
            for k, v in {
                "q": text, "base_id": base_id, "model_type": model_type, "task_type": task_type,
                "kind": kind, "name_or_path": name_or_path, "limit": str(limit),
            }.items()
            if v
        }
        data = self._request("GET", "/api/adapters", params=params).json()
        return [AdapterVersion.from_dict(d) for d in data["adapters"]]

    def info(self, ref: str) -> AdapterVersion:
        target = parse_ref(ref)
        data = self._request("GET", f"{self._path(target)}/versions/{target.version or LATEST}").json()
        return AdapterVersion.from_dict(data)

    def versions(self, ref: str) -> list[AdapterVersion]:
        target = parse_ref(ref, allow_version=False)
        data = self._request("GET", f"{self._path(target)}/versions").json()
        return [AdapterVersion.from_dict(d) for d in data["versions"]]

    def yank(self, ref: str, reason: str = "") -> AdapterVersion:
        target = parse_ref(ref, allow_latest=False)
        data = self._request("POST", f"{self._path(target)}/versions/{target.version}/yank", json={"reason": reason}).json()
        return AdapterVersion.from_dict(data)

    def delete(self, ref: str) -> None:
        target = parse_ref(ref, allow_latest=False)
        self._request("DELETE", f"{self._path(target)}/versions/{target.version}")

    # -- downloads ----------------------------------------------------------------------------

    def _blob_path(self, sha: str) -> Path:
        return self.cache_dir / "blobs" / sha[:2] / sha[2:]

    def _ref_file(self, ref: Ref) -> Path:
        server = re.sub(r"[^A-Za-z0-9.-]+", "_", self.url.split("://", 1)[1])
        return self.cache_dir / "refs" / server / ref.namespace / ref.name / str(ref.version)

    def _cached(self, sha: str) -> Path | None:
        path = self._blob_path(sha)
        if path.is_file() and sha256_file(path)[0] == sha:
            return path
        return None

    def download(self, ref: str) -> Path:
        target = parse_ref(ref)
        exact = target.version is not None and target.version != LATEST
        try:
            version = self.info(ref)
        except Unavailable:
            # Exact versions never change, so a remembered one is as good as asking the server.
            if exact and self._ref_file(target).is_file():
                cached = self._cached(self._ref_file(target).read_text().strip())
                if cached is not None:
                    return cached
            raise
        path = self._cached(version.sha256) or self._fetch(version)
        self._remember(Ref(version.namespace, version.name, version.version), version.sha256)
        return path

    def _fetch(self, version: AdapterVersion) -> Path:
        dest = self._blob_path(version.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = f"/api/adapters/{version.namespace}/{version.name}/versions/{version.version}/file"
        fd, tmp = tempfile.mkstemp(prefix=".dl-", suffix=".part", dir=dest.parent)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                try:
                    with self._http.stream("GET", url) as response:
                        if response.status_code >= 400:
                            response.read()
                            _raise_for_error(response)
                        etag = response.headers.get("etag", "").strip('"')
                        bar = _progress(version.size, f"pull {version.ref}", self.progress)
                        for chunk in response.iter_bytes(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                        if bar is not None:
                            bar.close()
                except httpx.TransportError as e:
                    raise Unavailable(f"download of {version.ref} from {self.url} failed: {e or type(e).__name__}") from None
                out.flush()
                os.fsync(out.fileno())
            got = h.hexdigest()
            if got != version.sha256 or (SHA256_RE.match(etag) and etag != version.sha256):
                raise IntegrityError(
                    f"download of {version.ref} is corrupt: sha256 {got[:12]}…, expected {version.sha256[:12]}…"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest

    def _remember(self, ref: Ref, sha: str) -> None:
        path = self._ref_file(ref)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ref-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(sha)
        os.replace(tmp, path)


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200]}"
    raise error_for_status(response.status_code, str(message))


__all__ = ["RemoteRegistry", "HubError"]
