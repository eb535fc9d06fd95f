"""One task = one ``.safetensors`` file.

The file holds the adapter's tensors (bottlenecks, layer-norm affines, head) and, in the safetensors
header metadata under the key ``"adapterkit"``, one JSON document::

    {"format": "adapterkit.adapter", "format_version": 1, "library_version": "0.1.0",
     "name": "sentiment",
     "config": {...AdapterConfig...},
     "task": {"type": "classification", "labels": ["neg", "pos"]},
     "head": {...head config...} | null,
     "base": {...base fingerprint...}}

Nothing here unpickles anything: tensors come from safetensors, everything else from JSON.

Here too: building that document for a model's adapter (``build_metadata``), checking a loaded one
against what the model can build (``check_adapter_metadata``), and matching an artifact's tensors to the
adapter its metadata describes (``load_tensors_strict``); ``AdapterModel`` calls these.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from . import __version__
from .atomic_io import atomic_write_bytes
from .config import AdapterConfig
from .tasks import HEAD_TYPES, TASKS, build_head

FORMAT = "adapterkit.adapter"
FORMAT_VERSION = 1
METADATA_KEY = "adapterkit"
REQUIRED_KEYS = ("format", "format_version", "name", "config", "task", "base")
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_layers", "probe", "id")
# Relative tolerance when comparing probe values: bf16 rounding moves a value by at most 2**-8 (0.39 %),
# so fp32, bf16 and fp16 copies of one base model match, while another checkpoint (even a light
# fine-tune of this one) moves sampled weights by more.
PROBE_RTOL = 5e-3
PROBE_ATOL = 1e-8


class ArtifactError(ValueError):
    """An adapter file that cannot be used: unreadable, truncated, corrupt or with bad metadata."""


class BaseModelMismatch(ValueError):
    """An adapter trained for another base model."""

    def __init__(self, path: str, expected: dict, found: dict):
        self.expected, self.found = expected, found
        stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
        if os.path.isfile(stem + ".base.safetensors"):  # `adapterkit train --full` writes the base beside it
            hint = (f"; {path} comes from full fine-tuning: its base weights are {stem}.base.safetensors, "
                    "load both with adapterkit.training.load_trained([artifact], base) or adapterkit predict/evaluate")
        else:
            hint = "; load it onto the base model it was trained on"
        super().__init__(
            f"{path}: adapter was trained for base model {describe_fingerprint(found)}, "
            f"but this model is {describe_fingerprint(expected)}{hint}"
        )


@dataclass(frozen=True)
class Artifact:
    """A parsed artifact: its metadata document and (optionally) its tensors."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return self.metadata["name"]


# ---------------------------------------------------------------------------------------------
# Base-model fingerprint
# ---------------------------------------------------------------------------------------------


def _config_dims(config: Any) -> tuple[int, int]:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or getattr(config, "n_embd", None)
    layers = (
        getattr(config, "num_hidden_layers", None)
        or getattr(config, "num_layers", None)
        or getattr(config, "n_layer", None)
        or getattr(config, "encoder_layers", None)
    )
    return int(hidden or 0), int(layers or 0)


def _probe_stats(weight: torch.Tensor, samples: int = 16) -> list[float]:
    """Mean |w| over a strided sample, and ``samples`` single values at fixed positions.

    Computed on the weight's own device from at most ~64k values, so fingerprinting a 7B model's
    embedding matrix copies kilobytes, not gigabytes.
    """
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    strided = flat[:: max(1, n // 65536)].double()
    positions = torch.arange(samples, device=flat.device, dtype=torch.long) * (n - 1) // max(1, samples - 1)
    picks = flat[positions].double().cpu()
    values = [strided.abs().mean().item(), *picks.tolist()]
    return [float(f"{v:.6g}") for v in values]


def base_fingerprint(model: torch.nn.Module, probe_weights: list[torch.Tensor]) -> dict[str, Any]:
    """Identify a base model by architecture, dimensions and statistics of a few of its weights.

    ``probe_weights`` are a few fixed weights of the model (the input embeddings and the first and last
    adapter sites). Statistics rather than raw bytes, so a bf16 or fp16 copy of a model matches its
    fp32 original while a different checkpoint does not.
    """
    config = model.config
    hidden, layers = _config_dims(config)
    probe = [v for w in probe_weights for v in _probe_stats(w)]
    digest_src = json.dumps([config.model_type, hidden, layers, [f"{v:.2e}" for v in probe[:: len(probe) // len(probe_weights)]]])
    short = hashlib.sha256(digest_src.encode()).hexdigest()[:12]
    return {
        "model_type": config.model_type,
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "hidden_size": hidden,
        "num_layers": layers,
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "probe": probe,
        "id": f"{config.model_type}-{hidden}x{layers}-{short}",
    }


def fingerprints_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two fingerprints describe the same base model (up to dtype rounding)."""
    for key in ("model_type", "hidden_size", "num_layers", "vocab_size"):
        if a.get(key) != b.get(key):
            return False
    pa, pb = a.get("probe") or [], b.get("probe") or []
    if len(pa) != len(pb):
        return False
    return all(math.isclose(x, y, rel_tol=PROBE_RTOL, abs_tol=PROBE_ATOL) for x, y in zip(pa, pb))


def describe_fingerprint(fp: dict[str, Any]) -> str:
    name = fp.get("name_or_path") or "?"
    # the id summarises coarse statistics (stable across dtypes, shared by light fine-tunes of one
    # base); the weights digest covers every probe value, so two fingerprints that differ read apart
    weights = hashlib.sha256(json.dumps(fp.get("probe")).encode()).hexdigest()[:8]
    return (
        f"[{fp.get('id')} weights {weights}: model_type={fp.get('model_type')}, hidden_size={fp.get('hidden_size')}, "
        f"layers={fp.get('num_layers')}, vocab={fp.get('vocab_size')}, from {name!r}]"
    )


# ---------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------


def validate_metadata(doc: Any, where: str = "artifact") -> dict[str, Any]:
    """Check the metadata document's shape; return it or raise ArtifactError naming the problem."""
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where}: metadata must be a JSON object, got {type(doc).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ArtifactError(f"{where}: metadata lacks required key(s) {', '.join(missing)}")
    if doc["format"] != FORMAT:
        raise ArtifactError(f"{where}: metadata format is {doc['format']!r}, expected {FORMAT!r}")
    if not isinstance(doc["format_version"], int) or doc["format_version"] > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: format_version {doc['format_version']!r} is not supported "
            f"(this adapterkit reads up to {FORMAT_VERSION}; upgrade adapterkit)"
        )
    if not isinstance(doc["name"], str) or not doc["name"]:
        raise ArtifactError(f"{where}: metadata 'name' must be a non-empty string")
    for key in ("config", "task", "base"):
        if not isinstance(doc[key], dict):
            raise ArtifactError(f"{where}: metadata {key!r} must be a JSON object")
    fp_missing = [k for k in FINGERPRINT_KEYS if k not in doc["base"]]
    if fp_missing:
        raise ArtifactError(f"{where}: base fingerprint lacks {', '.join(fp_missing)}")
    if not isinstance(doc["task"].get("type"), str):
        raise ArtifactError(f"{where}: metadata 'task.type' must be a string")
    labels = doc["task"].get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ArtifactError(f"{where}: metadata 'task.labels' must be a list of strings")
    return doc


def _parse_header_metadata(raw: dict[str, str] | None, where: str) -> dict[str, Any]:
    if not raw or METADATA_KEY not in raw:
        raise ArtifactError(f"{where}: no adapterkit metadata in the safetensors header (not an adapterkit artifact?)")
    try:
        doc = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{where}: adapterkit metadata is not valid JSON ({e})") from None
    return validate_metadata(doc, where)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate only the metadata document (cheap: the header, not the tensors)."""
    where = str(path)
    try:
        with safe_open(where, framework="pt") as f:
            raw = f.metadata()
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{where}: not a readable safetensors file ({e})") from None
    return _parse_header_metadata(raw, where)


def read_artifact(path: str | os.PathLike, device: str | torch.device = "cpu") -> Artifact:
    """Read and validate a whole artifact: metadata and every tensor.

    Every tensor is materialised here, so a truncated or corrupt file fails now, before anything is
    put into a model.
    """
    where = str(path)
    size = Path(where).stat().st_size  # FileNotFoundError propagates as is
    try:
        with safe_open(where, framework="pt", device=str(device)) as f:
            raw = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{where}: truncated or corrupt safetensors file ({size} bytes): {e}") from None
    doc = _parse_header_metadata(raw, where)
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{where}: tensor {k!r} holds NaN or infinite values")
    return Artifact(where, doc, tensors)


def write_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write an artifact atomically (``atomic_io``: temp file in the same folder, fsync, rename, fsync
    the folder). A crash at any point leaves either the old file or the new one, never a partial file.
    """
    validate_metadata(metadata, str(path))
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(cpu, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------------------------
# An adapter's metadata: built on save, checked on load
# ---------------------------------------------------------------------------------------------


def build_metadata(
    name: str,
    config: AdapterConfig,
    hidden_size: int,
    task: dict[str, Any],
    head_spec: dict[str, Any] | None,
    fingerprint: dict[str, Any],
    metrics: dict[str, float] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """The metadata document of one adapter; its config records the resolved bottleneck width."""
    saved = config.to_dict()
    saved["bottleneck_size"] = config.bottleneck_for(hidden_size)
    saved["reduction_factor"] = None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "name": name,
        "config": saved,
        "task": dict(task),
        "head": head_spec,
        "base": fingerprint,
        "metrics": dict(metrics or {}),
        "description": description,
    }


@dataclass(frozen=True)
class AdapterSpec:
    """What a checked metadata document asks the model to build."""

    config: AdapterConfig
    task_type: str
    labels: list[str]
    head_dropout: float


def check_adapter_metadata(meta: dict[str, Any], where: str) -> AdapterSpec:
    """Check an (already ``validate_metadata``-checked) document's config, task and head against each
    other; ArtifactError naming the problem, before anything is built."""
    try:
        config = AdapterConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{where}: bad adapter config in metadata: {e}") from None
    task = meta["task"]
    head_spec = meta.get("head")
    if head_spec is not None and (not isinstance(head_spec, dict) or not isinstance(head_spec.get("num_labels"), int)):
        raise ArtifactError(f"{where}: metadata 'head' must be null or an object with an integer num_labels; got {head_spec!r}")
    known = TASKS.get(task["type"])
    if (known is not None and known.head is not None) != bool(head_spec):
        raise ArtifactError(f"{where}: task type {task['type']!r} does not match its head {head_spec!r}")
    if head_spec and head_spec.get("num_labels") != len(task.get("labels", [])):
        raise ArtifactError(f"{where}: head has {head_spec.get('num_labels')} outputs but task lists {len(task.get('labels', []))} labels")
    return AdapterSpec(config, task["type"], list(task.get("labels", [])), (head_spec or {}).get("dropout", 0.1))


MAX_STACKED_ON = 15  # the adapters under one trained on a stack (composition.MAX_LEAVES less itself)


def stacked_on_of(meta: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The adapters an artifact was trained on top of (``Stack(*under, it)``), bottom first: each
    ``{"name", "sha256", "kind"}`` (the sha256 of its site tensors: ``fusion.member_digest``); [] for
    an adapter trained alone. ArtifactError when the field is malformed."""
    value = meta.get("stacked_on", [])
    if not isinstance(value, list) or len(value) > MAX_STACKED_ON:
        raise ArtifactError(f"{where}: metadata 'stacked_on' must be a list of at most {MAX_STACKED_ON} objects")
    for entry in value:
        if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64
                or not isinstance(entry.get("kind", ""), str)):
            raise ArtifactError(f"{where}: each 'stacked_on' entry needs a name and a 64-hex sha256; got {entry!r}")
    if len({e["name"] for e in value}) != len(value):
        raise ArtifactError(f"{where}: metadata 'stacked_on' names an adapter twice")
    return [{"name": e["name"], "sha256": e["sha256"], "kind": e.get("kind", "")} for e in value]


def load_tensors_strict(adapter: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load ``tensors`` into ``adapter`` when their names and shapes are exactly its state dict's;
    ArtifactError listing the differences otherwise (``adapter`` is then untouched)."""
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{where}: tensors do not match the adapter its metadata describes "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise ArtifactError(f"{where}: tensor shapes do not match: {'; '.join(wrong[:5])}")
    cast = {k: t.to(expected[k].dtype) for k, t in tensors.items()}
    # after the cast: a float64 1e300 is finite in the file and infinite in float32
    bad = [k for k, t in cast.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ArtifactError(f"{where}: tensor {bad[0]!r} holds values that are not finite in the adapter's "
                            f"{expected[bad[0]].dtype} (NaN, infinite, or out of its range)")
    adapter.load_state_dict(cast, strict=True)


# ---------------------------------------------------------------------------------------------
# The header alone: sizes checked before anything is allocated
# ---------------------------------------------------------------------------------------------

# safetensors allows a 100 MB header; an adapter's is a few kB (its tensor table and metadata).
HEADER_MAX_BYTES = 16 << 20
# The adapterkit JSON document inside it (labels dominate; 10,000 labels of 20 characters: 250 kB).
METADATA_MAX_BYTES = 1 << 20
# Caps on what metadata may ask a loader to build, whatever the file holds: a bottleneck wider than
# this is no bottleneck, and a head with more labels than this is not a classification head.
MAX_BOTTLENECK_SIZE = 8192
MAX_LABELS = 32768
MAX_LAYERS = 1024
MAX_HIDDEN_SIZE = 65536
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# What adapter parameters are saved as (every tensor of an artifact is a parameter)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it (nothing read from the data section)."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A safetensors header, parsed and checked: every tensor's bytes lie inside the file and match
    its dtype and shape, so no tensor can claim more memory than the file has bytes."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def read_header(path: str | os.PathLike, max_header_bytes: int = HEADER_MAX_BYTES) -> Header:
    """Parse a safetensors header without reading (or allocating) any tensor.

    The format: 8 bytes little-endian header length N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {str: str}}``, then
    the data. Raises ArtifactError for anything malformed, FileNotFoundError for a missing file.
    """
    where = str(path)
    with open(where, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ArtifactError(f"{where}: not a readable safetensors file ({size} bytes, shorter than its length field)")
        n = int.from_bytes(f.read(8), "little")
        if n > max_header_bytes:
            raise ArtifactError(
                f"{where}: truncated or corrupt safetensors file: header claims {n} bytes; at most {max_header_bytes} are accepted"
            )
        if 8 + n > size:
            raise ArtifactError(f"{where}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        raw = f.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"{where}: not a readable safetensors file: its header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where}: safetensors header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ArtifactError(f"{where}: safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{where}: header entry {name[:80]!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} has unknown dtype {str(dtype)[:20]!r}")
        if dtype not in FLOAT_DTYPES:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} is {dtype}; an artifact holds floating-point "
                                f"tensors only ({', '.join(FLOAT_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ArtifactError(f"{where}: tensor {name[:80]!r} has a malformed shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise ArtifactError(
                f"{where}: truncated or corrupt safetensors file: tensor {name[:80]!r} has data offsets outside "
                f"the file ({data_size} data bytes)"
            )
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if nbytes != offsets[1] - offsets[0]:
            raise ArtifactError(
                f"{where}: tensor {name[:80]!r} of shape {tuple(shape)} needs {nbytes} bytes, its offsets span {offsets[1] - offsets[0]}"
            )
        tensors[name] = TensorEntry(dtype, tuple(shape), nbytes)
    return Header(meta, tensors)


def check_size_caps(doc: dict[str, Any], hidden_size: int, where: str = "artifact") -> None:
    """Refuse metadata that asks for more than the caps above (before anything is built from it)."""
    config, labels = doc.get("config"), doc.get("task", {}).get("labels", [])
    if not isinstance(hidden_size, int) or not 0 < hidden_size <= MAX_HIDDEN_SIZE:
        raise ArtifactError(f"{where}: hidden size {hidden_size!r} is outside 1..{MAX_HIDDEN_SIZE}")
    head = doc.get("head")
    outputs = head.get("num_labels") if isinstance(head, dict) else None
    for count in (len(labels) if isinstance(labels, list) else 0, outputs if isinstance(outputs, int) else 0):
        if count > MAX_LABELS:
            raise ArtifactError(f"{where}: {count} labels; at most {MAX_LABELS} are accepted")
    try:
        r = AdapterConfig.from_dict(config).bottleneck_for(hidden_size)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise ArtifactError(f"{where}: bad adapter config in metadata: {e}") from None
    if r > MAX_BOTTLENECK_SIZE:
        raise ArtifactError(f"{where}: bottleneck size {r} is over the cap of {MAX_BOTTLENECK_SIZE}")


def expected_shapes(
    doc: dict[str, Any],
    hidden_size: int,
    norms_per_layer: list[int],
    pooling: str | None = "first",
    dims_per_layer: list[dict[str, tuple[int, int]]] | None = None,
    tensor_shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the adapter that ``doc`` describes, for a model with this hidden size
    and these layer norms: the real modules, built on the ``meta`` device (no memory for weights).

    Kinds sized by the projection they act on (LoRA, IA3) need each position's (in, out) features:
    ``dims_per_layer`` from the model (``AdapterModel``), or, without a model (the hub), read from the
    file's own ``tensor_shapes`` by the kind's module (its rank and targets are still checked)."""
    from .task_adapter import TaskAdapter  # the modules define the names and shapes; never restate them

    task = doc["task"]
    config = AdapterConfig.from_dict(doc["config"])
    with torch.device("meta"):
        head = None
        if task["type"] in HEAD_TYPES:
            # The head's own output count (a loader checks it against the labels afterwards).
            head_spec = doc.get("head")
            outputs = head_spec.get("num_labels") if isinstance(head_spec, dict) else None
            if isinstance(outputs, bool) or not isinstance(outputs, int):
                outputs = len(task.get("labels", []))
            spec = {"type": task["type"], "num_labels": outputs}
            head = build_head(spec, hidden_size, pooling or "first")
        kind = config.kind_spec
        if kind.sized_by_site and dims_per_layer is None:
            dims_per_layer = _dims_from_tensors(kind.module, tensor_shapes or {}, len(norms_per_layer))
        adapter = TaskAdapter(config, hidden_size, norms_per_layer, head=head, device="meta",
                              dims_per_layer=dims_per_layer if kind.sized_by_site else None)
    return {k: tuple(v.shape) for k, v in adapter.state_dict().items()}


def _dims_from_tensors(module: Any, shapes: dict[str, tuple[int, ...]], layers: int) -> list[dict[str, tuple[int, int]]]:
    """Per layer: position -> (in, out), as the file's tensors ``layers.{i}.{position}.*`` show them."""
    grouped: list[dict[str, dict[str, tuple[int, ...]]]] = [{} for _ in range(layers)]
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) < layers:
            grouped[int(parts[1])].setdefault(parts[2], {})[parts[3]] = tuple(shape)
    return [{p: module.dims_from_tensors(t) for p, t in per.items() if p != "norms"} for per in grouped]


def check_shapes(header: Header, expected: dict[str, tuple[int, ...]], where: str = "artifact") -> None:
    """ArtifactError unless the header holds exactly the expected tensors with the expected shapes."""
    missing = sorted(set(expected) - set(header.tensors))
    unexpected = sorted(set(header.tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{where}: tensors do not match the adapter its metadata describes "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {[u[:80] for u in unexpected[:5]]}{'...' if len(unexpected) > 5 else ''})"
        )
    wrong = [f"{k}: file {header.tensors[k].shape} vs model {v}" for k, v in expected.items() if header.tensors[k].shape != v]
    if wrong:
        raise ArtifactError(f"{where}: tensor shapes do not match: {'; '.join(wrong[:5])}")


def header_metadata(header: Header, where: str = "artifact", max_bytes: int = METADATA_MAX_BYTES) -> dict[str, Any]:
    """The validated adapterkit document of a parsed header (at most ``max_bytes`` of JSON)."""
    text = header.metadata.get(METADATA_KEY)
    if text is not None and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ArtifactError(f"{where}: adapterkit metadata is {len(text)} characters; at most {max_bytes} bytes are accepted")
    try:
        return _parse_header_metadata(header.metadata, where)
    except RecursionError:
        raise ArtifactError(f"{where}: adapterkit metadata is nested too deeply") from None


def check_artifact_shapes(
    path: str | os.PathLike,
    hidden_size: int,
    norms_per_layer: list[int],
    pooling: str | None = "first",
    *,
    expected_base: dict[str, Any] | None = None,
    dims_per_layer: list[dict[str, tuple[int, int]]] | None = None,
) -> dict[str, Any]:
    """Check an artifact from its header alone, for a model of these dimensions; return its metadata.

    Order: header bounds, metadata, (with ``expected_base``) the base fingerprint, the caps, then the
    exact tensor names and shapes that the config implies. Only then may a loader build modules:
    memory then follows from the file's own size, never from what its metadata claims.
    """
    where = str(path)
    header = read_header(path)
    doc = header_metadata(header, where)
    if expected_base is not None and not fingerprints_match(expected_base, doc["base"]):
        raise BaseModelMismatch(where, expected_base, doc["base"])
    check_size_caps(doc, hidden_size, where)
    if len(norms_per_layer) > MAX_LAYERS:
        raise ArtifactError(f"{where}: {len(norms_per_layer)} layers; at most {MAX_LAYERS} are accepted")
    try:
        expected = expected_shapes(doc, hidden_size, norms_per_layer, pooling, dims_per_layer=dims_per_layer)
    except (ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"{where}: metadata describes no buildable adapter: {e}") from None
    check_shapes(header, expected, where)
    return doc
