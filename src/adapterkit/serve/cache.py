"""Where adapters come from, and which of them are in the model right now.

A *source* turns a reference (what clients write in requests) into a local artifact file: a plain
folder of ``.safetensors`` files (reference = file stem) or a hub registry (reference =
``namespace/name[@version]``). ``AdapterCache`` loads referenced adapters into the model on demand and
evicts the least recently used ones when their parameters exceed a memory budget.

Threading: every change to the model (load, evict, unload) runs in the server's one model thread, the
same thread that runs forward passes, so a forward never sees a half-changed model. Bookkeeping (pins,
LRU order) is shared with the event loop under a lock.

One entry per resolved version: a source turns a reference into its *key* (``resolve``): the file
stem for a folder, ``namespace/name@version`` for a registry, so ``team/m``, ``team/m@1``,
``team/m@1.0`` and ``hub:team/m@latest`` share one loaded adapter. References without an exact
version are re-resolved every ``latest_ttl_s`` seconds, so a newly published version is picked up.
Loads that fail are remembered for ``negative_ttl_s`` seconds (the same error answers at once, nothing
is fetched or built again), and a load that would pass the memory budget while every loaded adapter
is in use, or pin more than ``max_pinned`` adapters at once, is refused with ``CacheFull`` (503).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..artifact import ArtifactError, BaseModelMismatch, read_header
from ..model import AdapterModel
from ..task_adapter import TaskAdapter
from .metrics import ServeMetrics

_STEM_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class UnknownAdapter(LookupError):
    """No artifact with this reference in the source (HTTP 404)."""


class BadReference(ValueError):
    """A reference the source cannot parse (HTTP 422)."""


class AdapterBusy(RuntimeError):
    """An unload asked for an adapter that queued requests still use (HTTP 409)."""


class SourceUnavailable(RuntimeError):
    """The registry could not be reached or failed (HTTP 502)."""


class CacheFull(RuntimeError):
    """Loading one more adapter now would pass the memory budget (or the pin cap) while every loaded
    adapter is in use (HTTP 503 with Retry-After)."""

    retry_after = 1


class AdapterSource(Protocol):
    """Turns a reference into a local artifact file."""

    def fetch(self, ref: str) -> Path:
        """The artifact for ``ref``; raises UnknownAdapter, BadReference or SourceUnavailable."""
        ...

    def resolve(self, ref: str) -> tuple[str, bool]:
        """``(key, exact)``: the one name of the artifact ``ref`` means now, and whether that can
        never change (an exact version, a file stem) or must be resolved again later (``@latest``)."""
        ...

    def available(self) -> list[str]:
        """References this source can serve (may be partial for large registries)."""
        ...


class FolderSource:
    """A folder of ``<name>.safetensors`` artifacts; the reference is the file stem."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapter folder {self.root} does not exist")

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"

    def fetch(self, ref: str) -> Path:
        # The stem rule keeps references from walking out of the folder ("../x", "/etc/x").
        if not _STEM_RE.match(ref) or ref in (".", ".."):
            raise UnknownAdapter(
                f"no adapter {ref[:80]!r} (names are file stems: letters, digits, '.', '_', '-')"
            )
        path = self.root / f"{ref}.safetensors"
        if not path.is_file():  # the folder is not named: answers never hold the server's paths
            raise UnknownAdapter(f"no adapter {ref!r}: there is no {path.name} in the adapter folder")
        return path

    def resolve(self, ref: str) -> tuple[str, bool]:
        return ref, True

    def available(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.safetensors") if _STEM_RE.match(p.stem))


class RegistrySource:
    """A hub registry (``LocalRegistry`` or ``RemoteRegistry``); references are
    ``namespace/name[@version]``, optionally prefixed with ``hub:``."""

    def __init__(self, registry: Any):
        self.registry = registry

    def __repr__(self) -> str:
        return f"RegistrySource({self.registry!r})"

    def fetch(self, ref: str) -> Path:

        text = ref[4:] if ref.startswith("hub:") else ref
        with self._errors(ref):
            return Path(self.registry.download(text))

    def resolve(self, ref: str) -> tuple[str, bool]:
        from ..hub.names import LATEST, parse_ref

        text = ref[4:] if ref.startswith("hub:") else ref
        with self._errors(ref):
            target = parse_ref(text)
            if target.version is not None and target.version != LATEST:
                return str(target), True  # parse_ref wrote the version canonically: no lookup needed
            return self.registry.info(text).ref, False

    @contextmanager
    def _errors(self, ref: str) -> Iterator[None]:
        from ..hub import errors as hub_errors  # imported with the registry, so already available

        try:
            yield
        except hub_errors.NotFound as e:
            raise UnknownAdapter(str(e)) from None
        except hub_errors.BadRequest as e:
            raise BadReference(str(e)) from None
        except FileNotFoundError:
            raise UnknownAdapter(f"adapter {ref[:300]!r}: its file is missing from the registry") from None
        except (hub_errors.HubError, OSError) as e:
            # An OSError's text holds local paths; a hub error's is the server's own message.
            why = str(e)[:500] if isinstance(e, hub_errors.HubError) else type(e).__name__
            raise SourceUnavailable(f"the adapter registry failed for {ref[:300]!r}: {why}") from None

    def available(self) -> list[str]:
        try:
            return sorted(v.ref for v in self.registry.search(limit=1000))
        except Exception:  # listing is a convenience; a registry that cannot list still serves
            return []


def open_source(spec: str | os.PathLike, token: str | None = None) -> AdapterSource:
    """``--registry``: a URL (hub server), a LocalRegistry folder (has ``index.db``) or a plain folder
    of ``.safetensors`` artifacts."""
    text = str(spec)
    if text.startswith(("http://", "https://")):
        from ..hub import RemoteRegistry

        return RegistrySource(RemoteRegistry(text, token=token or os.environ.get("ADAPTERKIT_TOKEN") or None))
    path = Path(text).expanduser()
    if (path / "index.db").is_file():
        from ..hub import LocalRegistry

        return RegistrySource(LocalRegistry(path))
    return FolderSource(path)


@dataclass
class LoadedAdapter:
    """An adapter in the model: its reference, its name inside the model and what it answers."""

    ref: str
    name: str
    task_type: str
    labels: list[str]
    nbytes: int
    pins: int = 0

    def info(self) -> dict[str, Any]:
        return {
            "adapter": self.ref,
            "task": self.task_type,
            "labels": list(self.labels),
            "bytes": self.nbytes,
            "in_use": self.pins,
        }


def adapter_bytes(module: TaskAdapter) -> int:
    """Bytes one loaded task adapter costs: its parameters and buffers (bottlenecks, norm affines,
    head), plus the copy of its bottlenecks and norm affines in the model's mixed-batch stacks."""
    own = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    stacked = sum(p.numel() * p.element_size() for p in module.layers.parameters())
    return own + stacked


class AdapterCache:
    """Adapters loaded on demand from ``source`` into ``model``, LRU-evicted over ``budget_bytes``.

    Requests *pin* the adapter they use (``acquire``) until their batch has run (``release``); pinned
    adapters are never evicted. When loading one more would pass the budget while every loaded
    adapter is pinned, or pin more than ``max_pinned`` at once, the load is refused (``CacheFull``).
    Entries are keyed by the source's key (one per resolved version); ``ref`` arguments may be any
    spelling of a reference.
    """

    def __init__(
        self,
        model: AdapterModel,
        source: AdapterSource,
        budget_bytes: int,
        metrics: ServeMetrics | None = None,
        *,
        max_pinned: int = 16,
        negative_ttl_s: float = 30.0,
        latest_ttl_s: float = 30.0,
        max_remembered: int = 1024,
    ):
        self.model = model
        self.source = source
        self.budget_bytes = int(budget_bytes)
        self.metrics = metrics or ServeMetrics()
        self.max_pinned = max_pinned
        self.negative_ttl_s = negative_ttl_s
        self.latest_ttl_s = latest_ttl_s
        self.max_remembered = max_remembered
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        # reference as written -> (key, resolved at, exact); exact ones never expire
        self._aliases: OrderedDict[str, tuple[str, float, bool]] = OrderedDict()
        # reference as written -> (the error its load raised, when)
        self._failures: OrderedDict[str, tuple[BaseException, float]] = OrderedDict()
        # reference as written -> keys pinned through it, oldest first (so release(ref) unpins the
        # entry that acquire(ref) pinned, even after "latest" moved on)
        self._pinned_via: dict[str, deque[str]] = {}

    # -- event-loop side (cheap, never touches the model) ---------------------------------------

    def _key(self, ref: str, now: float) -> str | None:
        """The key ``ref`` resolved to, when that is still current. Lock held."""
        alias = self._aliases.get(ref)
        if alias is None:
            return ref if ref in self._loaded else None
        key, when, exact = alias
        if not exact and now - when > self.latest_ttl_s:
            return None
        return key

    def acquire(self, ref: str) -> LoadedAdapter | None:
        """Pin and return ``ref`` when it is loaded (marking it most recently used); None otherwise."""
        with self._lock:
            key = self._key(ref, time.monotonic())
            return self._pin(key, ref) if key is not None else None

    def _pin(self, key: str, ref: str) -> LoadedAdapter | None:
        """Pin the entry ``key`` on behalf of ``ref``, when loaded. Lock held."""
        entry = self._loaded.get(key)
        if entry is not None:
            entry.pins += 1
            self._loaded.move_to_end(key)
            self._pinned_via.setdefault(ref, deque()).append(key)
        return entry

    def release(self, ref: str) -> bool:
        """Unpin; True when the cache is now over budget and ``trim`` should run (in the model thread)."""
        with self._lock:
            via = self._pinned_via.get(ref)
            key = via.popleft() if via else ref
            if via is not None and not via:
                del self._pinned_via[ref]
            entry = self._loaded.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
            return self._total() > self.budget_bytes

    def loaded(self) -> list[LoadedAdapter]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded.values())

    def total_bytes(self) -> int:
        with self._lock:
            return self._total()

    def _total(self) -> int:
        return sum(e.nbytes for e in self._loaded.values())

    def forget_failure(self, ref: str) -> None:
        """Drop a remembered failed load of ``ref`` (an operator's explicit load retries at once)."""
        with self._lock:
            self._failures.pop(ref, None)

    # -- model-thread side ----------------------------------------------------------------------

    def load_and_acquire(self, ref: str) -> LoadedAdapter:
        """Pin ``ref``, loading it first when needed. Model thread only.

        Raises UnknownAdapter, BadReference, ``artifact.BaseModelMismatch``,
        ``artifact.ArtifactError``, SourceUnavailable, CacheFull.
        """
        entry = self.acquire(ref)
        if entry is not None:
            return entry
        now = time.monotonic()
        with self._lock:
            failed = self._failures.get(ref)
            if failed is not None and now - failed[1] <= self.negative_ttl_s:
                self.metrics.load_failures_remembered.inc()
                raise failed[0].with_traceback(None)
        try:
            return self._load(ref, now)
        except (UnknownAdapter, BadReference, ArtifactError, BaseModelMismatch) as e:
            # Deterministic for these bytes (or this name): answer the same at once for a while
            # instead of fetching and checking again on every request.
            with self._lock:
                self._failures[ref] = (e, now)
                self._failures.move_to_end(ref)
                while len(self._failures) > self.max_remembered:
                    self._failures.popitem(last=False)
            raise

    def _load(self, ref: str, now: float) -> LoadedAdapter:
        key, exact = self.source.resolve(ref)
        with self._lock:
            self._aliases[ref] = (key, now, exact)
            self._aliases.move_to_end(ref)
            while len(self._aliases) > self.max_remembered:
                self._aliases.popitem(last=False)
            entry = self._pin(key, ref)  # another spelling of a loaded version
        if entry is not None:
            return entry
        path = self.source.fetch(key)
        self.trim()
        self._check_room(key, path)
        name = self._free_name(key)
        try:
            self.model.load_adapter(path, name=name)
        except FileNotFoundError:
            raise UnknownAdapter(f"adapter {ref[:300]!r}: its file is gone") from None
        except BaseModelMismatch as e:  # same error, without the server's path in its message
            raise BaseModelMismatch(f"adapter {ref[:300]!r}", e.expected, e.found) from None
        except ArtifactError as e:
            raise ArtifactError(f"adapter {ref[:300]!r} is unusable: {_without(str(e), path)}") from None
        module = self.model.adapters[name]
        task = module.task
        entry = LoadedAdapter(key, name, task["type"], list(task.get("labels", [])), adapter_bytes(module), pins=1)
        with self._lock:
            self._loaded[key] = entry
            self._pinned_via.setdefault(ref, deque()).append(key)
        self.metrics.loads.inc()
        self._changed()
        self.trim()
        return entry

    def _check_room(self, key: str, path: Path) -> None:
        """CacheFull when this load would pass the pin cap, or the budget counting only the adapters
        in use (the others are evicted after the load). One adapter alone always fits: a budget
        smaller than one adapter serves it rather than nothing."""
        try:
            # The header's tensor bytes, twice: the weights and their copy in the mixed-batch stacks.
            estimate = 2 * sum(t.nbytes for t in read_header(path).tensors.values())
        except (ArtifactError, OSError):
            estimate = 0  # load_adapter reports what is wrong with the file
        with self._lock:
            pinned = sum(1 for e in self._loaded.values() if e.pins)
            used = sum(e.nbytes for e in self._loaded.values() if e.pins)  # the rest can be evicted
        if pinned >= self.max_pinned:
            raise CacheFull(f"{pinned} adapters are in use, the most this server holds at once; try again shortly")
        if used and used + estimate > self.budget_bytes:
            raise CacheFull(
                f"loading adapter {key!r} (~{estimate} bytes) would pass the memory budget "
                f"({used} of {self.budget_bytes} bytes held by adapters in use); try again shortly"
            )

    def trim(self) -> list[str]:
        """Evict least recently used, unpinned adapters until under budget. Model thread only."""
        evicted = []
        with self._lock:
            while self._total() > self.budget_bytes:
                victim = next((e for e in self._loaded.values() if e.pins == 0), None)
                if victim is None:
                    break
                del self._loaded[victim.ref]
                self.model.delete_adapter(victim.name)
                evicted.append(victim.ref)
        if evicted:
            self.metrics.evictions.inc(len(evicted))
            self._changed()
        return evicted

    def unload(self, ref: str) -> None:
        """Remove ``ref`` from the model. Model thread only. Raises KeyError when not loaded,
        AdapterBusy while requests still hold it."""
        with self._lock:
            key = self._key(ref, time.monotonic()) or ref
            entry = self._loaded.get(key)
            if entry is None:
                raise KeyError(ref)
            if entry.pins:
                raise AdapterBusy(
                    f"adapter {ref!r} is used by {entry.pins} queued request(s); try again when they finish"
                )
            del self._loaded[key]
            self.model.delete_adapter(entry.name)
        self._changed()

    def _free_name(self, ref: str) -> str:
        # Model names may not hold '/', '.' (module paths) or '@'; references from a hub do.
        base = re.sub(r"[^A-Za-z0-9_-]", "_", ref) or "adapter"
        name, n = base, 1
        while name in self.model.adapters:
            n += 1
            name = f"{base}_{n}"
        return name

    def _changed(self) -> None:
        with self._lock:
            self.metrics.adapters_loaded.set(len(self._loaded))
            self.metrics.adapter_bytes.set(self._total())


def _without(message: str, path: Path) -> str:
    """``message`` with the server's file path taken out (answers never hold local paths)."""
    for text in (str(path), str(path.resolve()) if path.exists() else str(path)):
        message = message.replace(text + ": ", "").replace(text, path.name)
    return message
