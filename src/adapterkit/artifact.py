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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

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
        super().__init__(
            f"{path}: adapter was trained for base model {describe_fingerprint(found)}, "
            f"but this model is {describe_fingerprint(expected)}"
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
    return (
        f"[{fp.get('id')}: model_type={fp.get('model_type')}, hidden_size={fp.get('hidden_size')}, "
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
    """Write an artifact atomically: temp file in the same folder, fsync, rename, fsync the folder.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    validate_metadata(metadata, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(cpu, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; an artifact is meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return path
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
