"""AdapterFusion (Pfeiffer et al. 2021, arXiv 2005.00247): per-site attention over trained adapters'
outputs, and its one-file artifact.

At every site (layer, position) where a member adapter has a module, with ``out`` the site's output
(the hooked module's, before any member) and ``r_m = f_m(out)`` member m's output there (``out``
itself where m has no module)::

    q = out W_q,   k_m = r_m W_k,   v_m = r_m W_v                  # (..., d) each, per token
    s = softmax_m(q · k_m / T)                                      # (M, ...) over the M members
    result = Σ_m s_m v_m

The members stay frozen while the fusion trains (``AdapterModel.train_fusion``); the fusion may have a
task head of its own, which answers for rows routed to ``Fuse(..., fusion=name)``. Members that train
layer-norm affines are refused: the formula combines site outputs, and a norm's per-member affine has
no such output to attend over.

State-dict names (the artifact's tensor names): ``layers.{i}.{position}.{query,key,value}`` (each
(d, d), applied as ``x @ W``), ``head.*``.

The artifact is a ``.safetensors`` file whose header metadata, under ``"adapterkit"``, holds::

    {"format": "adapterkit.fusion", "format_version": 1, "library_version": "0.1.0", "name": "f",
     "members": [{"name": "a", "sha256": "...", "kind": "houlsby"}, ...],
     "temperature": 1.0, "task": {...}, "head": {...} | null, "base": {...base fingerprint...}}

A member's sha256 covers its site tensors (names, shapes, values as float32), not its head, which a
fusion never runs. Loading checks, from the header alone and before anything is allocated: the base
fingerprint, that every member is loaded and is the one the fusion was trained with, and the exact
tensor names and shapes that those members imply.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from . import __version__
from .artifact import (
    MAX_LABELS,
    METADATA_KEY,
    METADATA_MAX_BYTES,
    ArtifactError,
    BaseModelMismatch,
    check_shapes,
    fingerprints_match,
    read_header,
)
from .atomic_io import atomic_write_bytes
from .task_adapter import TaskAdapter
from .tasks import TASKS

FUSION_FORMAT = "adapterkit.fusion"
FUSION_FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "name", "members", "temperature", "task", "base")
MAX_MEMBERS = 16  # as composition.MAX_LEAVES


class FusionSite(nn.Module):
    """The fusion's attention at one site, over a ``dim``-wide output.

    Initialisation: ``W_v = I`` and ``W_q = 0``, so every score q·k_m is 0 and the softmax is uniform:
    a fresh fusion is exactly the average of its members' outputs (``Average``). ``W_k`` starts random
    (std d^-1/2) so that W_q's gradient, which is proportional to out^T k_m, is not zero at the first step.
    """

    def __init__(self, dim: int, **factory: Any):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim, dim, **factory))
        self.key = nn.Parameter(torch.randn(dim, dim, **factory) * dim ** -0.5)
        self.value = nn.Parameter(torch.eye(dim, **factory))
        self.temperature = 1.0  # set by AdapterFusion

    def query_key(self, out: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d): ``out W_q W_k^T``, since q·k_m = (out W_q)·(r_m W_k) = (out W_q W_k^T)·r_m
        (one matmul on ``out`` instead of one per member)."""
        w = self.query.to(out.dtype) @ self.key.to(out.dtype).t()
        return out @ w

    def combine(self, query_key: torch.Tensor, results: Sequence[torch.Tensor]) -> torch.Tensor:
        """The members' outputs (M of (..., d)) combined per token: Σ_m s_m (r_m W_v) = (Σ_m s_m r_m) W_v."""
        r = torch.stack([x.reshape(query_key.shape) for x in results])  # (M, ..., d)
        scores = (r * query_key).sum(-1) / self.temperature  # (M, ...)
        s = torch.softmax(scores, dim=0, dtype=torch.float32).to(r.dtype)
        mixed = (s.unsqueeze(-1) * r).sum(0)  # (..., d)
        return mixed @ self.value.to(mixed.dtype)


class AdapterFusion(nn.Module):
    """One fusion: a ``FusionSite`` at every (layer, position) of ``sites`` and, optionally, a task head.

    Args:
        members: the fused adapters' names (their order is only for messages and the artifact: the
            formula is symmetric in the members).
        sites: (layer, position) -> width of the output there.
        num_layers: the model's layer count.
        member_sites: each member's site keys ((layer, position)) when the fusion was built, so that a
            member deleted and re-added with another layout is refused (``check_members``).
        temperature: T in softmax(q·k / T).
    """

    def __init__(
        self,
        members: Sequence[str],
        sites: dict[tuple[int, str], int],
        num_layers: int,
        *,
        member_sites: dict[str, frozenset] | None = None,
        temperature: float = 1.0,
        head: nn.Module | None = None,
        task: dict[str, Any] | None = None,
        head_spec: dict[str, Any] | None = None,
        **factory: Any,
    ):
        super().__init__()
        if not (isinstance(temperature, int | float) and not isinstance(temperature, bool)
                and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"fusion temperature must be a positive finite number; got {temperature!r}")
        self.members = tuple(members)
        self.temperature = float(temperature)
        self.member_sites = dict(member_sites or {})
        self.task = task or {"type": "none", "labels": []}
        self.head_spec = head_spec
        layers = [nn.ModuleDict() for _ in range(num_layers)]
        for (layer, position), dim in sorted(sites.items()):
            site = FusionSite(dim, **factory)
            site.temperature = self.temperature
            layers[layer][position] = site
        self.layers = nn.ModuleList(layers)
        self.head = head
        self._table = {(i, p): m for i, la in enumerate(layers) for p, m in la.items()}

    def site(self, layer: int, position: str) -> FusionSite | None:
        return self._table.get((layer, position))

    def check_members(self, lookup: Callable[[str], TaskAdapter]) -> None:
        """ValueError unless every member is loaded with the layout it had when this fusion was built
        (KeyError from ``lookup`` for one that is not loaded)."""
        for name in self.members:
            adapter = lookup(name)
            check_member(name, adapter)
            expected = self.member_sites.get(name)
            if expected is not None and frozenset(site_keys(adapter)) != expected:
                raise ValueError(f"adapter {name!r} is not the one this fusion was built over: it acts at other "
                                 "sites now (deleted and added again?); build the fusion anew")


# ---------------------------------------------------------------------------------------------
# Members
# ---------------------------------------------------------------------------------------------


def site_keys(adapter: TaskAdapter) -> list[tuple[int, str]]:
    """The (layer, position) keys of an adapter's site modules (norm affines excluded)."""
    return [k for k in adapter._lookup() if isinstance(k[1], str)]


def check_member(name: str, adapter: TaskAdapter) -> None:
    """ValueError for an adapter a fusion cannot take."""
    if any(isinstance(k[1], int) for k in adapter._lookup()):
        raise ValueError(
            f"adapter {name!r} trains layer-norm affines, which a fusion cannot combine (it attends over "
            f"site outputs); fuse adapters built with AdapterConfig(..., train_layer_norms=False)"
        )


def member_digest(adapter: TaskAdapter) -> str:
    """sha256 of an adapter's site tensors: sorted names, shapes and float32 values (a member's head is
    left out: a fusion never runs it). float32 so the digest does not depend on the dtype it is kept in
    as long as its values are the same."""
    return tensors_digest(adapter.state_dict())


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """``member_digest`` of an adapter's state dict, or of its artifact's tensors (the same names), so
    a registry can name a fusion's members without building a model."""
    h = hashlib.sha256()
    for key, value in sorted(tensors.items()):
        if key.startswith("head."):
            continue
        t = value.detach().to("cpu", torch.float32).contiguous()
        h.update(json.dumps([key, list(t.shape)]).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------------


def build_fusion_metadata(
    name: str,
    fusion: AdapterFusion,
    members: dict[str, TaskAdapter],
    fingerprint: dict[str, Any],
    metrics: dict[str, float] | None = None,
    description: str = "",
) -> dict[str, Any]:
    return {
        "format": FUSION_FORMAT,
        "format_version": FUSION_FORMAT_VERSION,
        "library_version": __version__,
        "name": name,
        "members": [{"name": m, "sha256": member_digest(members[m]), "kind": members[m].config.kind}
                    for m in fusion.members],
        "temperature": fusion.temperature,
        "task": dict(fusion.task),
        "head": fusion.head_spec,
        "base": fingerprint,
        "metrics": dict(metrics or {}),
        "description": description,
    }


def write_fusion(path: str | os.PathLike, fusion: AdapterFusion, metadata: dict[str, Any]) -> Path:
    """The fusion's tensors and metadata, written atomically (``atomic_io``)."""
    check_fusion_metadata(metadata, str(path))
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in fusion.state_dict().items()}
    return atomic_write_bytes(path, save(cpu, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)}))


def check_fusion_metadata(doc: Any, where: str) -> dict[str, Any]:
    """The fusion document's shape: its fields and types, and the caps; ArtifactError naming the problem."""
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where}: metadata must be a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FUSION_FORMAT:
        raise ArtifactError(f"{where}: metadata format is {doc.get('format')!r}, expected {FUSION_FORMAT!r} "
                            "(an adapter artifact loads with load_adapter)")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise ArtifactError(f"{where}: fusion metadata lacks required key(s) {', '.join(missing)}")
    version = doc["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version > FUSION_FORMAT_VERSION:
        raise ArtifactError(f"{where}: fusion format_version {version!r} is not supported "
                            f"(this adapterkit reads up to {FUSION_FORMAT_VERSION})")
    if not isinstance(doc["name"], str) or not doc["name"]:
        raise ArtifactError(f"{where}: metadata 'name' must be a non-empty string")
    members = doc["members"]
    if (not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS
            or not all(isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("sha256"), str)
                       for m in members)):
        raise ArtifactError(f"{where}: metadata 'members' must list 2..{MAX_MEMBERS} objects with a name and a sha256")
    if len({m["name"] for m in members}) != len(members):
        raise ArtifactError(f"{where}: metadata 'members' names an adapter twice")
    t = doc["temperature"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise ArtifactError(f"{where}: metadata 'temperature' must be a positive number; got {t!r}")
    task, head = doc["task"], doc.get("head")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str) or task["type"] not in TASKS:
        raise ArtifactError(f"{where}: metadata 'task' must be an object with a known task type")
    labels = task.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) > MAX_LABELS:
        raise ArtifactError(f"{where}: metadata 'task.labels' must be a list of at most {MAX_LABELS} strings")
    has_head = TASKS[task["type"]].head is not None
    if has_head != (head is not None):
        raise ArtifactError(f"{where}: task type {task['type']!r} does not match its head {head!r}")
    if head is not None and (not isinstance(head, dict) or head.get("num_labels") != len(labels)
                             or head.get("type") != task["type"]):
        raise ArtifactError(f"{where}: metadata 'head' must be an object of the task's type with one output per label")
    if not isinstance(doc["base"], dict):
        raise ArtifactError(f"{where}: metadata 'base' must be a JSON object")
    return doc


def read_fusion_header(path: str | os.PathLike):
    """The header (bounds checked: no tensor read or allocated) and the checked fusion document."""
    where = str(path)
    header = read_header(path)
    text = header.metadata.get(METADATA_KEY)
    if text is None:
        raise ArtifactError(f"{where}: no adapterkit metadata in the safetensors header (not an adapterkit fusion?)")
    if len(text.encode("utf-8", "surrogatepass")) > METADATA_MAX_BYTES:
        raise ArtifactError(f"{where}: adapterkit metadata is over {METADATA_MAX_BYTES} bytes")
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"{where}: adapterkit metadata is not valid JSON ({type(e).__name__})") from None
    return header, check_fusion_metadata(doc, where)


def check_fusion_file(
    path: str | os.PathLike,
    lookup: Callable[[str], TaskAdapter],
    expected_base: dict[str, Any] | None,
    expected_shapes: Callable[[dict[str, Any], list[TaskAdapter]], dict[str, tuple[int, ...]]],
) -> dict[str, Any]:
    """Check a fusion file against the model from its header alone; return its document.

    Order: header bounds, metadata, base fingerprint, each member (loaded, no norm affines, the same
    tensors by sha256), then the exact tensor names and shapes those members imply (``expected_shapes``
    of the document and the member adapters, built on the meta device by the caller)."""
    where = str(path)
    header, doc = read_fusion_header(path)
    if expected_base is not None and not fingerprints_match(expected_base, doc["base"]):
        raise BaseModelMismatch(where, expected_base, doc["base"])
    adapters = []
    for m in doc["members"]:
        try:
            adapter = lookup(m["name"])
        except KeyError:
            raise ArtifactError(f"{where}: fusion member {m['name']!r} is not loaded; load the adapters it fuses "
                                f"({', '.join(x['name'] for x in doc['members'])}) first") from None
        try:
            check_member(m["name"], adapter)
        except ValueError as e:
            raise ArtifactError(f"{where}: {e}") from None
        digest = member_digest(adapter)
        if digest != m["sha256"]:
            raise ArtifactError(f"{where}: loaded adapter {m['name']!r} differs from the one this fusion was trained "
                                f"with (sha256 {digest[:12]} vs {m['sha256'][:12]}); load that adapter's artifact")
        adapters.append(adapter)
    try:
        expected = expected_shapes(doc, adapters)
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from None
    check_shapes(header, expected, where)
    return doc


def read_fusion_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an (already header-checked) fusion file, on the CPU; ArtifactError when corrupt."""
    where = str(path)
    try:
        with safe_open(where, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{where}: truncated or corrupt safetensors file: {e}") from None
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{where}: tensor {k!r} holds NaN or infinite values")
    return tensors
