"""The registry interface and its implementation over an index and a blob store.

``IndexedRegistry(index, blobs)`` keeps its rows in an ``Index`` (SQLite, or PostgreSQL for several
servers: ``index.py``, ``index_postgres.py``) and the bytes in a content-addressed ``BlobBackend``
(a folder, or S3: ``store.py``, ``blobs_s3.py``). ``LocalRegistry(path)`` is the embedded one: SQLite
``index.db`` (WAL) beside ``blobs/``. A publish stores the blob first (temp file, fsync, then a rename
or one checksummed PUT) and then the index row, both while holding the index's writer lock, in one
transaction; so a crash at any point leaves at worst an unreferenced blob or temp file, never a row
for a partial file. Opening a registry reconciles the two: orphan blobs and dead temp files are
removed, rows whose blob is gone are flagged ``missing`` and hidden.
"""

from __future__ import annotations

import abc
import getpass
import json
import math
import os
import re
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..artifact import (
    FINGERPRINT_KEYS,
    MAX_HIDDEN_SIZE,
    MAX_LAYERS,
    METADATA_KEY,
    ArtifactError,
    Header,
    check_shapes,
    check_size_caps,
    describe_fingerprint,
    expected_shapes,
    fingerprints_match,
    header_metadata,
    read_artifact,
    read_header,
)
from .errors import BadRequest, Conflict, Forbidden, IntegrityError, InvalidArtifact, NotFound
from .index import Connection, Index, Row, SqliteIndex
from .names import (
    LATEST,
    NAME_MAX,
    Ref,
    canonical_version,
    has_surrogate,
    parse_ref,
    validate_name,
    validate_version,
    version_key,
)
from .query import SearchQuery
from .store import CHUNK, BlobBackend, BlobStore, Upload, sha256_file

DESCRIPTION_MAX = 4000
# The artifact's adapterkit metadata document: it is indexed and sent in every search answer.
METADATA_MAX_BYTES = 256 << 10
METRICS_MAX_KEYS = 64
METRIC_KEY_MAX = 64
METRIC_TEXT_MAX = 200
SCHEMA_VERSION = 1
FUSION_FORMAT = "adapterkit.fusion"  # as fusion.FUSION_FORMAT (fusion.py is imported only for a fusion)
FUSION_KIND = "fusion"  # the index's kind column for a fusion artifact
# Published adapters whose digest is compared with one fusion member's, at most (same base and kind;
# same name first, then the newest): bounds the work of one publish.
MEMBER_CANDIDATES_MAX = 64


def default_home() -> Path:
    """``$ADAPTERKIT_HOME``, else ``$XDG_CACHE_HOME/adapterkit``, else ``~/.cache/adapterkit``."""
    if os.environ.get("ADAPTERKIT_HOME"):
        return Path(os.environ["ADAPTERKIT_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "adapterkit"


@dataclass(frozen=True)
class AdapterVersion:
    """One published version of an adapter, as the index records it."""

    namespace: str
    name: str
    version: str
    sha256: str
    size: int
    created: float
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    base_id: str = ""
    model_type: str = ""
    name_or_path: str = ""
    kind: str = ""
    bottleneck_size: int | None = None
    task_type: str = ""
    labels: list[str] = field(default_factory=list)
    publisher: str | None = None
    yanked: bool = False
    yank_reason: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    library_version: str = ""
    # the artifact's ``source`` record when it was converted from another library (``format``:
    # "peft" or "adapters", that library's version, the base model id the source named, ...)
    source: dict[str, Any] = field(default_factory=dict)
    # a fusion's members, as its artifact names them ({"name", "sha256", "kind"}: the sha256 of the
    # member's site tensors), each with "ref" (``namespace/name@version``) when this registry holds it
    members: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dependencies(self) -> list[str]:
        """The exact references a fusion needs loaded first (its members this registry holds)."""
        return [m["ref"] for m in self.members if isinstance(m, dict) and isinstance(m.get("ref"), str)]

    @property
    def source_format(self) -> str:
        """The format the adapter was made in: "peft" or "adapters" when converted, else "adapterkit"."""
        fmt = self.source.get("format") if isinstance(self.source, dict) else None
        return fmt if isinstance(fmt, str) and fmt else "adapterkit"

    @property
    def base_model_id(self) -> str:
        """The base model's portable id (a Hugging Face Hub id), when the artifact records one; "" when it
        records only a local path (which means nothing on another machine, and is never shown)."""
        from ..interop.card import card_base_id

        return card_base_id({"base": {"name_or_path": self.name_or_path}, "source": self.source}) or ""

    @property
    def base_label(self) -> str:
        """What a page shows as the base model: its id, else "unknown base (folder NAME, fingerprint ID)"."""
        from ..interop.card import base_name

        if self.base_model_id:
            return self.base_model_id
        source = self.source if isinstance(self.source, dict) else {}
        folder = base_name(self.name_or_path) or base_name(str(source.get("base_folder") or ""))
        return f"unknown base ({f'folder {folder}, ' if folder else ''}fingerprint {self.base_id})"

    @property
    def adapter(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ref(self) -> str:
        """``namespace/name@version``: the exact, immutable reference."""
        return f"{self.namespace}/{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref"] = self.ref
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterVersion:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Registry(abc.ABC):
    """What every registry offers; references are ``namespace/name[@version|@latest]``."""

    @abc.abstractmethod
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
        """Publish an artifact file as ``ref`` (version auto-incremented when not given).

        ``base``, when given, is the base model the publisher says the adapter is for (a fingerprint
        or a fingerprint id); the artifact's own fingerprint must match it.
        """

    def search(
        self,
        text: SearchQuery | str | None = None,
        *,
        base_id: str | None = None,
        model_type: str | None = None,
        task_type: str | None = None,
        kind: str | None = None,
        name_or_path: str | None = None,
        limit: int | None = None,
    ) -> list[AdapterVersion]:
        """The latest usable version of each matching adapter, sorted by name.

        ``text`` is a ``SearchQuery`` or the search words; the keyword filters build (or override
        fields of) the query. Backends implement ``find``.
        """
        given = {
            "base_id": base_id, "model_type": model_type, "task_type": task_type, "kind": kind,
            "name_or_path": name_or_path, "limit": limit,
        }
        return self.find(SearchQuery.of(text, **{k: v for k, v in given.items() if v is not None}))

    @abc.abstractmethod
    def find(self, query: SearchQuery) -> list[AdapterVersion]:
        """``search`` with a ``SearchQuery``: the latest usable version of each adapter matching it."""

    @abc.abstractmethod
    def info(self, ref: str) -> AdapterVersion:
        """One version; without a version (or ``@latest``) the newest one not yanked."""

    @abc.abstractmethod
    def versions(self, ref: str) -> list[AdapterVersion]:
        """Every version of an adapter that was not deleted (yanked ones included), oldest first."""

    @abc.abstractmethod
    def download(self, ref: str) -> Path:
        """A local file holding the version's bytes, verified against its sha256."""

    @abc.abstractmethod
    def yank(self, ref: str, reason: str = "") -> AdapterVersion:
        """Hide a version from ``latest`` and search; it stays downloadable by its exact number."""

    @abc.abstractmethod
    def delete(self, ref: str) -> None:
        """Remove a version's bytes; its number stays taken (versions are immutable)."""


# ---------------------------------------------------------------------------------------------
# Checks shared by the local registry and the server
# ---------------------------------------------------------------------------------------------


def validate_metrics(metrics: Any) -> dict[str, Any]:
    """Metrics are a flat JSON object of numbers (or short strings), e.g. ``{"accuracy": 0.91}``."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise BadRequest(f"metrics must be a JSON object like {{\"accuracy\": 0.9}}, got {type(metrics).__name__}")
    if len(metrics) > METRICS_MAX_KEYS:
        raise BadRequest(f"metrics has {len(metrics)} entries; at most {METRICS_MAX_KEYS} are allowed")
    for key, value in metrics.items():
        if not isinstance(key, str) or not key or len(key) > METRIC_KEY_MAX or not key.isprintable():
            raise BadRequest(f"metric name {key!r} must be a printable string of 1 to {METRIC_KEY_MAX} characters")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BadRequest(f"metric {key!r} must be a number or a short string, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"metric {key!r} is {value}; metrics must be finite")
        if isinstance(value, str) and len(value) > METRIC_TEXT_MAX:
            raise BadRequest(f"metric {key!r} is longer than {METRIC_TEXT_MAX} characters")
    return dict(metrics)


def validate_description(description: Any) -> str:
    if description is None:
        return ""
    if not isinstance(description, str):
        raise BadRequest("description must be a string")
    if len(description) > DESCRIPTION_MAX:
        raise BadRequest(f"description is {len(description)} characters long; at most {DESCRIPTION_MAX} are allowed")
    if any(not (ch.isprintable() or ch in "\n\t") for ch in description):
        raise BadRequest("description contains control characters")
    return description


def check_artifact(path: Path, declared_base: dict[str, Any] | str | None = None, label: str = "upload") -> dict[str, Any]:
    """Validate a whole artifact file; return its metadata document or raise InvalidArtifact.

    Reading goes through ``adapterkit.artifact`` (every tensor is materialised, so truncation and
    corruption show up here); on top of that the hub needs the fields it indexes to be usable and the
    fingerprint to be self-consistent and to match the base the publisher declared.
    """
    try:
        # The header first: metadata size, caps and tensor shapes, before any tensor is read.
        header = read_header(path)
        if not header.tensors:
            raise InvalidArtifact(f"{label}: the artifact holds no tensors")
        if _is_fusion(header):
            return _check_fusion_artifact(path, header, declared_base, label)
        doc = header_metadata(header, label, max_bytes=METADATA_MAX_BYTES)
        if has_surrogate(doc):  # SQLite, JSON answers and pages all need encodable text
            raise InvalidArtifact(f"{label}: metadata holds a lone UTF-16 surrogate or is nested too deeply")
        check_header_shapes(header, doc, label)
        art = read_artifact(path)
    except ArtifactError as e:
        raise InvalidArtifact(str(e).replace(str(path), label)) from None
    doc = art.metadata
    kind = doc["config"].get("kind")
    if not isinstance(kind, str) or not kind:
        raise InvalidArtifact(f"{label}: metadata 'config.kind' must be a string such as 'houlsby'")
    size = doc["config"].get("bottleneck_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise InvalidArtifact(f"{label}: metadata 'config.bottleneck_size' must be a positive integer, got {size!r}")
    check_fingerprint(doc["base"], declared_base, label)
    return doc


def check_fingerprint(fp: dict[str, Any], declared_base: dict[str, Any] | str | None, label: str) -> None:
    """The base fingerprint is self-consistent and matches the base the publisher declared."""
    missing = [k for k in FINGERPRINT_KEYS if k not in fp]
    if missing:
        raise InvalidArtifact(f"{label}: base fingerprint lacks {', '.join(missing)}")
    for key in ("hidden_size", "num_layers"):
        if isinstance(fp[key], bool) or not isinstance(fp[key], int) or fp[key] <= 0:
            raise InvalidArtifact(f"{label}: base fingerprint '{key}' must be a positive integer, got {fp[key]!r}")
    probe = fp["probe"]
    if not isinstance(probe, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in probe):
        raise InvalidArtifact(f"{label}: base fingerprint 'probe' must be a list of finite numbers")
    # The id is built as "<model_type>-<hidden>x<layers>-<hash>"; a mismatch means an edited header.
    prefix = f"{fp['model_type']}-{fp['hidden_size']}x{fp['num_layers']}-"
    if not isinstance(fp["id"], str) or not fp["id"].startswith(prefix) or len(fp["id"]) == len(prefix):
        raise InvalidArtifact(
            f"{label}: base fingerprint is inconsistent: id {fp['id']!r} does not match "
            f"model_type={fp['model_type']!r}, hidden_size={fp['hidden_size']}, num_layers={fp['num_layers']}"
        )
    if declared_base is not None:
        if isinstance(declared_base, str):
            ok = declared_base == fp["id"]
            declared_text = repr(declared_base)
        else:
            ok = fingerprints_match(declared_base, fp)
            declared_text = describe_fingerprint(declared_base)
        if not ok:
            raise InvalidArtifact(
                f"{label}: base fingerprint does not match the declared base: the artifact is for "
                f"{describe_fingerprint(fp)}, the publisher declared {declared_text}"
            )


def _is_fusion(header: Header) -> bool:
    text = header.metadata.get(METADATA_KEY) or ""
    if len(text) > METADATA_MAX_BYTES:
        return False  # the adapter path refuses it, saying why
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FUSION_FORMAT


_FUSION_TENSOR_RE = re.compile(r"^layers\.(\d{1,4})\.([a-z0-9_]{1,32})\.(query|key|value)$")


def _check_fusion_artifact(path: Path, header: Header, declared_base: dict[str, Any] | str | None,
                           label: str) -> dict[str, Any]:
    """A fusion artifact (``fusion.py``): its document, then its tensors' names and shapes from the
    header (square (d, d) query / key / value per site; the head the document describes), then every
    tensor read, then the fingerprint. The exact sites are checked by a model's ``load_fusion``."""
    import torch

    from ..fusion import read_fusion_header, read_fusion_tensors
    from ..tasks import build_head

    try:
        _, doc = read_fusion_header(path)
    except ArtifactError as e:
        raise InvalidArtifact(str(e).replace(str(path), label)) from None
    if has_surrogate(doc):
        raise InvalidArtifact(f"{label}: metadata holds a lone UTF-16 surrogate or is nested too deeply")
    check_fingerprint(doc["base"], declared_base, label)
    sites: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    head: dict[str, tuple[int, ...]] = {}
    for name, entry in header.tensors.items():
        if name.startswith("head."):
            head[name[len("head."):]] = entry.shape
            continue
        m = _FUSION_TENSOR_RE.match(name)
        if m is None or int(m.group(1)) >= doc["base"]["num_layers"]:
            raise InvalidArtifact(f"{label}: tensor {name!r} is not a fusion layer of this base's layers")
        d = entry.shape[0] if entry.shape else 0
        if entry.shape != (d, d) or not 0 < d <= MAX_HIDDEN_SIZE:
            raise InvalidArtifact(f"{label}: fusion tensor {name!r} has shape {entry.shape}; expected (d, d)")
        sites.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = entry.shape
    if not sites:
        raise InvalidArtifact(f"{label}: the fusion artifact holds no fusion layers")
    for (layer, position), parts in sites.items():
        if len(parts) != 3 or len(set(parts.values())) != 1:
            raise InvalidArtifact(f"{label}: fusion layer {layer}.{position} needs query, key and value of one shape")
    if doc["head"] is None:
        expected_head: dict[str, tuple[int, ...]] = {}
    else:
        try:
            with torch.device("meta"):  # shapes only: no memory for weights (pooling changes no shape)
                module = build_head(doc["head"], doc["base"]["hidden_size"], "first")
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidArtifact(f"{label}: metadata describes no buildable head: {e}") from None
        expected_head = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if head != expected_head:
        raise InvalidArtifact(f"{label}: the head's tensors do not match the head its metadata describes")
    try:
        read_fusion_tensors(path)  # every tensor materialised: truncation, corruption, NaN show up here
    except ArtifactError as e:
        raise InvalidArtifact(str(e).replace(str(path), label)) from None
    return doc


_LAYER_RE = re.compile(r"^layers\.(\d{1,4})\.(?:norms\.(\d{1,4})\.)?")


def check_header_shapes(header: Header, doc: dict[str, Any], label: str = "upload") -> None:
    """The loader's shape check without a model: the hidden size comes from the fingerprint, the
    layer count and norms per layer from the tensor names (a model checks those against itself when
    it loads), the rest from the config. So a file whose metadata claims a bottleneck, or a label
    count, that its tensors do not have is refused here, never published."""
    fp = doc["base"]
    hidden = fp.get("hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
        raise InvalidArtifact(f"{label}: base fingerprint 'hidden_size' must be a positive integer, got {hidden!r}")
    layers = 0
    norms: dict[int, int] = {}
    for name in header.tensors:
        m = _LAYER_RE.match(name)
        if m:
            i = int(m.group(1))
            layers = max(layers, i + 1)
            if m.group(2) is not None:
                norms[i] = max(norms.get(i, 0), int(m.group(2)) + 1)
    if layers > MAX_LAYERS:
        raise InvalidArtifact(f"{label}: tensors for {layers} layers; at most {MAX_LAYERS} are accepted")
    check_size_caps(doc, hidden, label)
    try:
        expected = expected_shapes(doc, hidden, [norms.get(i, 0) for i in range(layers)],
                                   tensor_shapes={k: tuple(t.shape) for k, t in header.tensors.items()})
    except (ValueError, TypeError, KeyError) as e:
        raise InvalidArtifact(f"{label}: metadata describes no buildable adapter: {e}") from None
    check_shapes(header, expected, label)


def parse_declared_base(value: Any) -> dict[str, Any] | str | None:
    """A declared base is a fingerprint id string or a fingerprint object."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if len(value) > 200 or not value.isprintable():
            raise BadRequest("declared base id must be a printable string of at most 200 characters")
        return value
    if isinstance(value, dict) and all(k in value for k in ("model_type", "hidden_size", "num_layers", "probe")):
        return value
    raise BadRequest("declared base must be a fingerprint id or an object with model_type, hidden_size, num_layers and probe")


# ---------------------------------------------------------------------------------------------
# LocalRegistry
# ---------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    namespace TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL,
    description TEXT NOT NULL DEFAULT '', metrics TEXT NOT NULL DEFAULT '{}', metadata TEXT NOT NULL,
    base_id TEXT NOT NULL, model_type TEXT NOT NULL, name_or_path TEXT NOT NULL,
    kind TEXT NOT NULL, bottleneck_size INTEGER, task_type TEXT NOT NULL, labels TEXT NOT NULL,
    publisher TEXT,
    yanked INTEGER NOT NULL DEFAULT 0, yank_reason TEXT NOT NULL DEFAULT '',
    deleted INTEGER NOT NULL DEFAULT 0, missing INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, name, version)
);
CREATE INDEX IF NOT EXISTS versions_sha256 ON versions (sha256);
CREATE TABLE IF NOT EXISTS namespaces (name TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL, owner TEXT NOT NULL, created REAL NOT NULL, revoked REAL
);
"""


def _row_to_version(row: Row) -> AdapterVersion:
    doc = json.loads(row["metadata"])
    return AdapterVersion(
        namespace=row["namespace"],
        name=row["name"],
        version=row["version"],
        sha256=row["sha256"],
        size=row["size"],
        created=row["created"],
        description=row["description"],
        metrics=json.loads(row["metrics"]),
        base_id=row["base_id"],
        model_type=row["model_type"],
        name_or_path=row["name_or_path"],
        kind=row["kind"],
        bottleneck_size=row["bottleneck_size"],
        task_type=row["task_type"],
        labels=json.loads(row["labels"]),
        publisher=row["publisher"],
        yanked=bool(row["yanked"]),
        yank_reason=row["yank_reason"],
        base=doc.get("base", {}),
        config=doc.get("config", {}),
        library_version=str(doc.get("library_version", "")),
        source=doc["source"] if isinstance(doc.get("source"), dict) else {},
        members=list(doc.get("members", [])) if doc.get("format") == FUSION_FORMAT else [],
    )


class IndexedRegistry(Registry):
    """A registry over an ``Index`` (SQLite or PostgreSQL) and a ``BlobBackend`` (folder or S3).

    Safe to use from many threads and processes at once: every change runs in one index transaction
    holding the index's writer lock (see ``index.py``). ``LocalRegistry`` is the embedded one;
    ``backends.open_backends`` builds one from URLs.
    """

    def __init__(self, index: Index, blobs: BlobBackend, *, reconcile: bool = True):
        self.index = index
        self.blobs = blobs
        index.ensure_schema(_SCHEMA, {"schema_version": str(SCHEMA_VERSION)})
        self.last_reconcile: dict[str, int] = {}
        if reconcile:
            self.last_reconcile = self.reconcile()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index!r}, {self.blobs!r})"

    def close(self) -> None:
        self.index.close()
        self.blobs.close()

    # -- database plumbing --------------------------------------------------------------------

    def _read(self) -> AbstractContextManager[Connection]:
        return self.index.read()

    def _write(self) -> AbstractContextManager[Connection]:
        """One transaction holding the index's writer lock from the start."""
        return self.index.write()

    # -- consistency --------------------------------------------------------------------------

    def reconcile(self) -> dict[str, int]:
        """Make the index and the blob store agree after a crash; return what was fixed.

        Runs under the write lock, and publishers move blobs into place only under it, so every blob
        seen here either has its committed row or was left by a crash.
        """
        with self._write() as db:
            stale = self.blobs.remove_stale_temps()
            on_disk = self.blobs.sizes()
            live = {r[0] for r in db.execute("SELECT DISTINCT sha256 FROM versions WHERE deleted = 0")}
            orphans = [sha for sha in on_disk if sha not in live]
            for sha in orphans:
                self.blobs.remove(sha)
            missing = sorted(live - set(on_disk))
            db.execute("UPDATE versions SET missing = 0 WHERE missing = 1")
            for sha in missing:
                db.execute("UPDATE versions SET missing = 1 WHERE sha256 = ? AND deleted = 0", (sha,))
        return {"stale_temps": stale, "orphan_blobs": len(orphans), "missing_blobs": len(missing)}

    def check(self, deep: bool = True) -> list[str]:
        """Problems found (empty when consistent): rows without blobs, blobs without rows, temp files,
        and with ``deep`` blobs whose bytes do not hash to their name."""
        problems: list[str] = []
        on_disk = self.blobs.sizes()
        with self._read() as db:
            rows = db.execute("SELECT namespace, name, version, sha256, size FROM versions WHERE deleted = 0").fetchall()
        live = set()
        for r in rows:
            live.add(r["sha256"])
            if r["sha256"] not in on_disk:
                problems.append(f"{r['namespace']}/{r['name']}@{r['version']}: blob {r['sha256'][:12]} is missing")
            elif on_disk[r["sha256"]] != r["size"]:
                problems.append(f"{r['namespace']}/{r['name']}@{r['version']}: blob size differs from the index")
        for sha in on_disk:
            if sha not in live:
                problems.append(f"blob {sha[:12]} has no index row")
            elif deep and self.blobs.hash_of(sha) != sha:
                problems.append(f"blob {sha[:12]} does not hash to its name")
        problems += [f"temp file {p.name} left over" for p in self.blobs.temp_files()]
        return problems

    # -- publishing ---------------------------------------------------------------------------

    def publish(
        self,
        path: str | os.PathLike,
        ref: str,
        version: str | None = None,
        description: str | None = None,
        metrics: dict[str, Any] | None = None,
        *,
        base: dict[str, Any] | str | None = None,
        owner: str | None = None,
    ) -> AdapterVersion:
        """See ``Registry.publish``. ``owner`` (used by the server) enforces namespace ownership."""
        target = self._publish_target(ref, version)
        if not Path(path).is_file():
            raise BadRequest(f"{path}: no such file")
        # Copy first, validate the copy: the bytes checked are exactly the bytes stored.
        with self.blobs.upload() as upload, open(path, "rb") as src:
            while chunk := src.read(CHUNK):
                upload.write(chunk)
            return self.publish_upload(upload, target, description, metrics, base=base, owner=owner, label=str(path))

    def _publish_target(self, ref: str, version: str | None) -> Ref:
        target = parse_ref(ref, allow_latest=False)
        if version is not None:
            version = validate_version(version, allow_latest=False)
            if target.version is not None and target.version != version:
                raise BadRequest(f"two versions given: {target.version!r} in the reference and {version!r}")
            target = target.with_version(version)
        return target

    def check_can_publish(self, ref: Ref, owner: str | None) -> None:
        """Cheap early answer (before an upload is read): Forbidden or Conflict, if already certain.
        ``publish_upload`` checks again under the write lock, which is what counts."""
        with self._read() as db:
            if owner is not None:
                # One statement, so one snapshot: as two, a publisher committing the namespace's owner
                # and its first version between them looks like an ownerless namespace with versions.
                row = db.execute(
                    "SELECT (SELECT owner FROM namespaces WHERE name = ?) AS owner,"
                    " EXISTS (SELECT 1 FROM versions WHERE namespace = ?) AS used",
                    (ref.namespace, ref.namespace),
                ).fetchone()
                if row["owner"] is not None and row["owner"] != owner:
                    raise Forbidden(_not_yours(ref.namespace, row["owner"], owner))
                if row["owner"] is None and row["used"]:
                    raise Forbidden(_ownerless(ref.namespace))
            if ref.version is not None:
                row = db.execute(
                    "SELECT deleted FROM versions WHERE namespace=? AND name=? AND version=?",
                    (ref.namespace, ref.name, ref.version),
                ).fetchone()
                if row is not None:
                    raise Conflict(_exists(ref, bool(row["deleted"])))

    def publish_upload(
        self,
        upload: Upload,
        ref: Ref,
        description: str | None = None,
        metrics: dict[str, Any] | None = None,
        *,
        base: dict[str, Any] | str | None = None,
        owner: str | None = None,
        label: str = "upload",
    ) -> AdapterVersion:
        """Validate a filled temp file and make it visible as ``ref`` (one transaction)."""
        description = validate_description(description)
        metrics = validate_metrics(metrics)
        base = parse_declared_base(base)
        if owner is not None:
            validate_name(owner, "owner")
        if upload.size == 0:
            raise InvalidArtifact(f"{label}: the file is empty")
        sha = upload.finish()
        doc = check_artifact(upload.path, base, label)
        if not description:
            description = validate_description(str(doc.get("description", ""))[:DESCRIPTION_MAX])
        if not metrics and isinstance(doc.get("metrics"), dict):
            try:
                metrics = validate_metrics(doc["metrics"])
            except BadRequest:
                metrics = {}
        fp, task = doc["base"], doc["task"]
        fused = doc.get("format") == FUSION_FORMAT
        if fused:  # its members as dependencies: by this registry's reference where it holds them
            doc = {**doc, "members": self._member_refs(doc)}
        kind = FUSION_KIND if fused else doc["config"]["kind"]
        bottleneck = None if fused else doc["config"].get("bottleneck_size")
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT owner FROM namespaces WHERE name = ?", (ref.namespace,)).fetchone()
            if row is None:
                used = db.execute("SELECT 1 FROM versions WHERE namespace = ? LIMIT 1", (ref.namespace,)).fetchone()
                if used is not None and owner is not None:
                    raise Forbidden(_ownerless(ref.namespace))
                # The first publisher into a namespace owns it; a local publish records the local
                # user, so that serving this folder later hands nobody else the namespace.
                db.execute("INSERT INTO namespaces VALUES (?, ?, ?)", (ref.namespace, owner or local_owner(), now))
            elif owner is not None and row["owner"] != owner:
                raise Forbidden(_not_yours(ref.namespace, row["owner"], owner))
            taken = {  # canonical spellings: a legacy "1.0" row takes "1"
                canonical_version(r["version"]): bool(r["deleted"])
                for r in db.execute("SELECT version, deleted FROM versions WHERE namespace=? AND name=?", (ref.namespace, ref.name))
            }
            version = ref.version
            if version is None:
                version = str(max((version_key(v)[0] for v in taken), default=0) + 1)
            elif version in taken:
                raise Conflict(_exists(ref, taken[version]))
            self.blobs.adopt(upload)
            db.execute(
                "INSERT INTO versions (namespace, name, version, sha256, size, created, description, metrics,"
                " metadata, base_id, model_type, name_or_path, kind, bottleneck_size, task_type, labels, publisher)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ref.namespace, ref.name, version, sha, upload.size, now, description,
                    json.dumps(metrics, sort_keys=True), json.dumps(doc, sort_keys=True),
                    str(fp["id"]), str(fp["model_type"]), str(fp.get("name_or_path") or ""),
                    kind, bottleneck, task["type"],
                    json.dumps(task.get("labels", [])), owner,
                ),
            )
            # Same bytes published again bring back rows flagged missing earlier.
            db.execute("UPDATE versions SET missing = 0 WHERE sha256 = ?", (sha,))
            row = db.execute(
                "SELECT * FROM versions WHERE namespace=? AND name=? AND version=?", (ref.namespace, ref.name, version)
            ).fetchone()
        return _row_to_version(row)

    def _member_refs(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """A fusion's members, each with ``ref`` where an adapter version in this registry (same base,
        same kind, not deleted) has exactly its site tensors (``fusion.tensors_digest``); the same name
        first, then the newest. The others stay named by name and sha256 alone."""
        from ..fusion import tensors_digest

        with self._read() as db:
            rows = db.execute(
                "SELECT namespace, name, version, sha256, kind, created FROM versions"
                " WHERE deleted = 0 AND missing = 0 AND base_id = ? AND kind != ?",
                (str(doc["base"]["id"]), FUSION_KIND),
            ).fetchall()
        digests: dict[str, str | None] = {}  # blob sha256 -> site digest (None: unreadable)

        def digest_of(blob: str) -> str | None:
            if blob not in digests:
                path = self.blobs.local_path(blob)
                try:
                    digests[blob] = None if path is None else tensors_digest(read_artifact(path).tensors or {})
                except (ArtifactError, OSError):
                    digests[blob] = None
            return digests[blob]

        out = []
        for m in doc["members"]:
            member = {"name": m["name"], "sha256": m["sha256"], "kind": str(m.get("kind", ""))}
            candidates = [r for r in rows if not member["kind"] or r["kind"] == member["kind"]]
            candidates.sort(key=lambda r: (r["name"] != m["name"], -r["created"]))
            for r in candidates[:MEMBER_CANDIDATES_MAX]:
                if digest_of(r["sha256"]) == m["sha256"]:
                    member["ref"] = f"{r['namespace']}/{r['name']}@{r['version']}"
                    break
            out.append(member)
        return out

    # -- reading ------------------------------------------------------------------------------

    def _rows(self, db: Connection, ref: Ref) -> list[Row]:
        return db.execute("SELECT * FROM versions WHERE namespace=? AND name=?", (ref.namespace, ref.name)).fetchall()

    def _resolve(self, db: Connection, ref: Ref) -> Row:
        rows = self._rows(db, ref)
        if not rows:
            raise NotFound(f"no adapter {ref.adapter!r} in this registry")
        if ref.version is None or ref.version == LATEST:
            usable = [r for r in rows if not r["deleted"] and not r["yanked"] and not r["missing"]]
            if not usable:
                raise NotFound(f"{ref.adapter} has no usable version (all are yanked, deleted or missing)")
            return max(usable, key=lambda r: version_key(r["version"]))
        for r in rows:
            if canonical_version(r["version"]) == ref.version:
                if r["deleted"]:
                    raise NotFound(f"{ref} was deleted")
                if r["missing"]:
                    raise NotFound(f"{ref} is listed but its file is missing from the blob store")
                return r
        listed = ", ".join(sorted((r["version"] for r in rows if not r["deleted"]), key=version_key)) or "none"
        raise NotFound(f"{ref.adapter} has no version {ref.version!r} (versions: {listed})")

    def info(self, ref: str) -> AdapterVersion:
        target = parse_ref(ref)
        with self._read() as db:
            return _row_to_version(self._resolve(db, target))

    def versions(self, ref: str) -> list[AdapterVersion]:
        target = parse_ref(ref, allow_version=False)
        with self._read() as db:
            rows = [r for r in self._rows(db, target) if not r["deleted"]]
        if not rows:
            raise NotFound(f"no adapter {target.adapter!r} in this registry")
        return sorted((_row_to_version(r) for r in rows), key=lambda v: version_key(v.version))

    def find(self, query: SearchQuery) -> list[AdapterVersion]:
        sql = "SELECT * FROM versions WHERE deleted = 0 AND yanked = 0 AND missing = 0"
        args: list[Any] = []
        for column, value in query.filters().items():  # column names come from query.FILTERS
            sql += f" AND {column} = ?"
            args.append(value)
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        latest: dict[tuple[str, str], Row] = {}
        for r in rows:
            key = (r["namespace"], r["name"])
            if key not in latest or version_key(r["version"]) > version_key(latest[key]["version"]):
                latest[key] = r
        found = [v for v in (_row_to_version(r) for _, r in sorted(latest.items())) if query.matches(v)]
        return found[: query.limit]

    def blob_path(self, version: AdapterVersion) -> Path:
        """Where a version's bytes are stored (not re-hashed: for serving, the client verifies)."""
        path = self.blobs.local_path(version.sha256)
        if path is None:
            raise NotFound(f"{version.ref} is listed but its file is missing from the blob store")
        return path

    def download(self, ref: str) -> Path:
        """The blob itself (read-only), after checking that it still hashes to its sha256."""
        version = self.info(ref)
        path = self.blob_path(version)
        sha, _ = sha256_file(path)
        if sha != version.sha256:
            raise IntegrityError(f"{version.ref}: stored file is corrupt (sha256 {sha[:12]}…, expected {version.sha256[:12]}…)")
        return path

    # -- yank / delete ------------------------------------------------------------------------

    def _exact(self, ref: str) -> Ref:
        target = parse_ref(ref, allow_latest=False)
        if target.version is None:
            raise BadRequest(f"{ref!r}: give an exact version, e.g. {target.adapter}@1")
        return target

    def _check_owner(self, db: Connection, target: Ref, owner: str | None) -> None:
        """Forbidden unless ``owner`` may change ``target.namespace``. ``owner=None`` is local use
        (whoever can open the folder can write it anyway) and may change anything."""
        if owner is None:
            return
        row = db.execute("SELECT owner FROM namespaces WHERE name = ?", (target.namespace,)).fetchone()
        if row is None:
            # Versions without an owner row: pushed by an older adapterkit, or written into the
            # folder directly. Nobody may take them over through the server.
            raise Forbidden(_ownerless(target.namespace))
        if row["owner"] != owner:
            raise Forbidden(_not_yours(target.namespace, row["owner"], owner))

    def yank(self, ref: str, reason: str = "", *, owner: str | None = None) -> AdapterVersion:
        target = self._exact(ref)
        reason = validate_description(reason)[:500]
        with self._write() as db:
            row = self._resolve(db, target)
            self._check_owner(db, target, owner)
            db.execute(
                "UPDATE versions SET yanked = 1, yank_reason = ? WHERE namespace=? AND name=? AND version=?",
                (reason, target.namespace, target.name, row["version"]),
            )
            return _row_to_version(self._resolve(db, target))

    def delete(self, ref: str, *, owner: str | None = None) -> None:
        target = self._exact(ref)
        with self._write() as db:
            row = self._resolve(db, target)
            self._check_owner(db, target, owner)
            db.execute(
                "UPDATE versions SET deleted = 1 WHERE namespace=? AND name=? AND version=?",
                (target.namespace, target.name, row["version"]),
            )
            still_used = db.execute("SELECT 1 FROM versions WHERE sha256 = ? AND deleted = 0", (row["sha256"],)).fetchone()
            if still_used is None:  # content-addressed: other versions may share these bytes
                self.blobs.remove(row["sha256"])

    # -- namespaces ---------------------------------------------------------------------------

    def namespaces(self) -> dict[str, str | None]:
        """Every namespace with versions or an owner: name -> owner (None: ownerless)."""
        with self._read() as db:
            owners = {r["name"]: r["owner"] for r in db.execute("SELECT name, owner FROM namespaces")}
            used = {r[0] for r in db.execute("SELECT DISTINCT namespace FROM versions")}
        return {ns: owners.get(ns) for ns in sorted(used | set(owners))}

    def set_owner(self, namespace: str, owner: str) -> None:
        """Give ``namespace`` to ``owner`` (an administrator's act: it needs the registry folder, not
        a token). The way to hand over an ownerless namespace, or to move one between owners."""
        validate_name(namespace, "namespace")
        validate_name(owner, "owner")
        with self._write() as db:
            db.execute(
                "INSERT INTO namespaces VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET owner = excluded.owner",
                (namespace, owner, time.time()),
            )

    # -- misc ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._read() as db:
            adapters = db.execute(
                "SELECT COUNT(*) FROM (SELECT DISTINCT namespace, name FROM versions WHERE deleted = 0) AS adapters"
            ).fetchone()[0]
            versions = db.execute("SELECT COUNT(*) FROM versions WHERE deleted = 0").fetchone()[0]
        return {"adapters": adapters, "versions": versions}

    def facets(self) -> dict[str, list[str]]:
        """Distinct model types, task types and kinds on offer (for the web page's filters)."""
        out: dict[str, list[str]] = {}
        with self._read() as db:
            for column in ("model_type", "task_type", "kind"):
                out[column] = [
                    r[0]
                    for r in db.execute(
                        f"SELECT DISTINCT {column} FROM versions WHERE deleted = 0 AND yanked = 0 ORDER BY {column}"
                    )
                ]
        return out


@dataclass(frozen=True)
class Pulled:
    """What ``pull`` fetched: the version and its verified file, then (for a fusion) each member this
    registry holds, and the members it does not hold (name, sha256, kind: load those from elsewhere)."""

    version: AdapterVersion
    path: Path
    members: list[tuple[AdapterVersion, Path]] = field(default_factory=list)
    unresolved: list[dict[str, Any]] = field(default_factory=list)


def pull(registry: Registry, ref: str) -> Pulled:
    """Download ``ref`` (verified against its sha256) and, for a fusion, its members too, by the exact
    references recorded when it was published (versions are immutable, so these are the very tensors
    it was trained over)."""
    version = registry.info(ref)
    path = registry.download(version.ref)
    members, unresolved = [], []
    for m in version.members:
        if isinstance(m.get("ref"), str):
            members.append((registry.info(m["ref"]), registry.download(m["ref"])))
        else:
            unresolved.append(dict(m))
    return Pulled(version, path, members, unresolved)


class LocalRegistry(IndexedRegistry):
    """The embedded registry: ``index.db`` (SQLite) + ``blobs/`` + ``tmp/`` under ``path``."""

    def __init__(self, path: str | os.PathLike | None = None, *, reconcile: bool = True):
        self.root = Path(path).expanduser() if path is not None else default_home()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "index.db"
        super().__init__(SqliteIndex(self.db_path), BlobStore(self.root), reconcile=reconcile)

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"


def _not_yours(namespace: str, owner: str, who: str) -> str:
    return f"namespace {namespace!r} belongs to {owner!r}, not {who!r}; publish into a namespace of your own"


def _ownerless(namespace: str) -> str:
    return (
        f"namespace {namespace!r} has versions but no owner (written locally or by an older adapterkit); "
        f"the hub's administrator can assign it: adapterkit hub namespace set-owner {namespace} OWNER --root FOLDER"
    )


def local_owner() -> str:
    """Who a local publish records as a new namespace's owner: ``$ADAPTERKIT_OWNER``, else the login
    name made into a valid name (so a token created for that name manages it), else ``local``."""
    candidates = [os.environ.get("ADAPTERKIT_OWNER", "")]
    try:
        candidates.append(getpass.getuser())
    except (OSError, KeyError):  # no login name (some containers)
        pass
    for text in candidates:
        name = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-._")[:NAME_MAX]
        if name and ".." not in name:
            return name
    return "local"


def _exists(ref: Ref, deleted: bool) -> str:
    if deleted:
        return f"{ref} was published and deleted; versions are immutable, so publish a new version number"
    return f"{ref} already exists; versions are immutable, so publish a new version number (or omit it)"
