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
from ..atomic_io import atomic_write_text
from .errors import BadRequest, HubError, IntegrityError, InvalidArtifact, Unavailable, error_for_status
from .names import LATEST, Ref, parse_ref, validate_name, validate_version
from .query import SearchQuery
from .registry import AdapterVersion, Registry, default_home
from .store import CHUNK, fsync_dir, sha256_file

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Transfers smaller than this get no progress bar.
PROGRESS_MIN_BYTES = 8 << 20
# A JSON answer larger than this is refused unread (a search of 1000 results is ~1-2 MB).
JSON_ANSWER_MAX = 64 << 20


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

    def _json(self, response: httpx.Response) -> Any:
        if len(response.content) > JSON_ANSWER_MAX:
            raise HubError(f"the hub at {self.url} sent a {len(response.content)}-byte answer; refused")
        try:
            return response.json()
        except ValueError:
            raise HubError(f"the hub at {self.url} did not answer JSON (HTTP {response.status_code})") from None

    def _version(self, data: Any, expect: Ref | None = None) -> AdapterVersion:
        """An ``AdapterVersion`` from the server's JSON, every field checked (a malicious or broken hub
        must not be able to name files outside the cache) and, when ``expect`` is given, the
        namespace, name and exact version equal to what was asked for."""
        try:
            return checked_version(data, expect)
        except (BadRequest, TypeError, ValueError) as e:
            raise HubError(f"the hub at {self.url} answered an invalid adapter record: {e}") from None

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
            _read_either_metadata(path)
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
        info = self._version(self._json(response), target.with_version(version))
        if info.sha256 != sha:
            raise IntegrityError(f"the hub recorded sha256 {info.sha256[:12]}… for a file with sha256 {sha[:12]}…")
        return info

    def _read_chunks(self, path: Path, size: int) -> Iterator[bytes]:
        bar = _progress(size, f"push {path.name}", self.progress)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                if bar is not None:
                    bar.update(len(chunk))
                yield chunk
        if bar is not None:
            bar.close()

    def find(self, query: SearchQuery) -> list[AdapterVersion]:
        data = self._json(self._request("GET", "/api/adapters", params=query.to_params()))
        found = [self._version(d) for d in _list(data, "adapters")]
        if len(found) > query.limit:
            raise HubError(f"the hub at {self.url} answered {len(found)} results for a limit of {query.limit}")
        return found

    def info(self, ref: str) -> AdapterVersion:
        target = parse_ref(ref)
        data = self._json(self._request("GET", f"{self._path(target)}/versions/{target.version or LATEST}"))
        return self._version(data, target)

    def versions(self, ref: str) -> list[AdapterVersion]:
        target = parse_ref(ref, allow_version=False)
        data = self._json(self._request("GET", f"{self._path(target)}/versions"))
        return [self._version(d, target) for d in _list(data, "versions")]

    def yank(self, ref: str, reason: str = "") -> AdapterVersion:
        target = parse_ref(ref, allow_latest=False)
        response = self._request("POST", f"{self._path(target)}/versions/{target.version}/yank", json={"reason": reason})
        return self._version(self._json(response), target)

    def delete(self, ref: str) -> None:
        target = parse_ref(ref, allow_latest=False)
        self._request("DELETE", f"{self._path(target)}/versions/{target.version}")

    # -- downloads ----------------------------------------------------------------------------

    def _blob_path(self, sha: str) -> Path:
        if not SHA256_RE.match(sha):  # checked on arrival too; a path is never built from anything else
            raise IntegrityError(f"not a sha256: {sha[:80]!r}")
        return self.cache_dir / "blobs" / sha[:2] / sha[2:]

    def _ref_file(self, ref: Ref) -> Path:
        # Every part is validated (names: [a-z0-9._-], no ".."; version: digits and dots), so the
        # path stays under refs/; the server part is the URL with everything else replaced.
        ref = Ref(validate_name(ref.namespace, "namespace"), validate_name(ref.name, "adapter name"), validate_version(str(ref.version), allow_latest=False))
        server = re.sub(r"[^A-Za-z0-9-]+", "_", self.url.split("://", 1)[1])
        return self.cache_dir / "refs" / server / ref.namespace / ref.name / ref.version

    def _cached(self, sha: str) -> Path | None:
        if not SHA256_RE.match(sha):
            return None
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
        atomic_write_text(path, sha)


def _read_either_metadata(path: Path) -> dict[str, Any]:
    """An adapter's metadata, or a fusion's (``fusion.py``: imported only for one); the adapter's error
    when it is neither."""
    try:
        return read_metadata(path)
    except ArtifactError as e:
        from ..fusion import read_fusion_header

        try:
            return read_fusion_header(path)[1]
        except ArtifactError:
            raise e from None


_STR_FIELDS = ("description", "base_id", "model_type", "name_or_path", "kind", "task_type", "yank_reason", "library_version")


def checked_version(data: Any, expect: Ref | None = None) -> AdapterVersion:
    """Validate one adapter record from a hub's JSON (see ``RemoteRegistry._version``)."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    namespace = validate_name(data.get("namespace"), "namespace")
    name = validate_name(data.get("name"), "adapter name")
    version = data.get("version")
    if not isinstance(version, str):
        raise ValueError("version is missing")
    if validate_version(version, allow_latest=False) != version:
        raise ValueError(f"version {version!r} is not in canonical form")
    sha = data.get("sha256")
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise ValueError("sha256 is not 64 lowercase hex digits")
    size = data.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("size is not a whole number of bytes")
    for key in _STR_FIELDS:
        if not isinstance(data.get(key, ""), str):
            raise ValueError(f"{key} is not a string")
    labels = data.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError("labels is not a list of strings")
    for key in ("metrics", "base", "config", "source"):
        if not isinstance(data.get(key, {}), dict):
            raise ValueError(f"{key} is not a JSON object")
    members = data.get("members", [])
    if not isinstance(members, list) or len(members) > 64:
        raise ValueError("members is not a list")
    for m in members:  # a fusion's; a member's ref is later downloaded, so it must be an exact reference
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not isinstance(m.get("sha256"), str):
            raise ValueError("a member has no name or sha256")
        if "ref" in m and (not isinstance(m["ref"], str) or parse_ref(m["ref"], allow_latest=False).version is None):
            raise ValueError(f"member ref {m.get('ref')!r} is not an exact namespace/name@version")
    if expect is not None:
        if (namespace, name) != (expect.namespace, expect.name):
            raise ValueError(f"asked for {expect.adapter}, got {namespace}/{name}")
        if expect.version not in (None, LATEST) and version != expect.version:
            raise ValueError(f"asked for {expect}, got version {version}")
    return AdapterVersion.from_dict(data)


def _list(data: Any, key: str) -> list[Any]:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise HubError(f"the hub's answer has no list {key!r}")
    return items


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200]}"
    raise error_for_status(response.status_code, str(message)[:2000])


__all__ = ["RemoteRegistry", "HubError"]
