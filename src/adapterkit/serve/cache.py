"""Where adapters come from, and which of them are in the model right now.

A *source* turns a reference (what clients write in requests) into a local artifact file: a plain
folder of ``.safetensors`` files (reference = file stem) or a hub registry (reference =
``namespace/name[@version]``). ``AdapterCache`` loads referenced adapters into the model on demand and
evicts the least recently used ones when their parameters exceed a memory budget.

Threading: every change to the model (load, evict, unload) runs in the server's one model thread, the
same thread that runs forward passes, so a forward never sees a half-changed model. Bookkeeping (pins,
LRU order) is shared with the event loop under a lock.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


class AdapterSource(Protocol):
    """Turns a reference into a local artifact file."""

    def fetch(self, ref: str) -> Path:
        """The artifact for ``ref``; raises UnknownAdapter, BadReference or SourceUnavailable."""
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
                f"no adapter {ref!r} in {self.root} (names are file stems: letters, digits, '.', '_', '-')"
            )
        path = self.root / f"{ref}.safetensors"
        if not path.is_file():
            raise UnknownAdapter(f"no adapter {ref!r}: {path.name} is not in {self.root}")
        return path

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
        from ..hub import errors as hub_errors  # imported with the registry, so already available

        text = ref[4:] if ref.startswith("hub:") else ref
        try:
            return Path(self.registry.download(text))
        except hub_errors.NotFound as e:
            raise UnknownAdapter(str(e)) from None
        except hub_errors.BadRequest as e:
            raise BadReference(str(e)) from None
        except (hub_errors.HubError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise UnknownAdapter(str(e)) from None
            raise SourceUnavailable(f"registry {self.registry!r} failed for {ref!r}: {e}") from None

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
    adapters are never evicted, so when every loaded adapter is pinned the budget is exceeded for as
    long as that lasts, rather than failing requests.
    """

    def __init__(
        self,
        model: AdapterModel,
        source: AdapterSource,
        budget_bytes: int,
        metrics: ServeMetrics | None = None,
    ):
        self.model = model
        self.source = source
        self.budget_bytes = int(budget_bytes)
        self.metrics = metrics or ServeMetrics()
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first

    # -- event-loop side (cheap, never touches the model) ---------------------------------------

    def acquire(self, ref: str) -> LoadedAdapter | None:
        """Pin and return ``ref`` when it is loaded (marking it most recently used); None otherwise."""
        with self._lock:
            entry = self._loaded.get(ref)
            if entry is not None:
                entry.pins += 1
                self._loaded.move_to_end(ref)
            return entry

    def release(self, ref: str) -> bool:
        """Unpin; True when the cache is now over budget and ``trim`` should run (in the model thread)."""
        with self._lock:
            entry = self._loaded.get(ref)
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

    # -- model-thread side ----------------------------------------------------------------------

    def load_and_acquire(self, ref: str) -> LoadedAdapter:
        """Pin ``ref``, loading it first when needed. Model thread only.

        Raises UnknownAdapter, BadReference, ``artifact.BaseModelMismatch``,
        ``artifact.ArtifactError``, SourceUnavailable.
        """
        entry = self.acquire(ref)
        if entry is not None:
            return entry
        path = self.source.fetch(ref)
        name = self._free_name(ref)
        try:
            self.model.load_adapter(path, name=name)
        except FileNotFoundError as e:
            raise UnknownAdapter(f"adapter {ref!r}: {e}") from None
        module = self.model.adapters[name]
        task = module.task
        entry = LoadedAdapter(
            ref, name, task["type"], list(task.get("labels", [])), adapter_bytes(module), pins=1
        )
        with self._lock:
            self._loaded[ref] = entry
        self.metrics.loads.inc()
        self._changed()
        self.trim()
        return entry

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
            entry = self._loaded.get(ref)
            if entry is None:
                raise KeyError(ref)
            if entry.pins:
                raise AdapterBusy(
                    f"adapter {ref!r} is used by {entry.pins} queued request(s); try again when they finish"
                )
            del self._loaded[ref]
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
