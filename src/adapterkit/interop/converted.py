"""A foreign checkpoint translated into adapterkit's terms, and putting it into a model.

Readers (``peft_format``, ``adapters_format``) produce a ``Converted``: an ``AdapterConfig``, the task
head and labels, and the full state dict of the ``TaskAdapter`` that config builds. ``install`` adds it
to the model only when every tensor name and shape is exactly what that adapter expects, so a failed
import leaves the model as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from ..config import AdapterConfig
from .module_map import InteropError

if TYPE_CHECKING:
    from ..model import AdapterModel


@dataclass
class Converted:
    """One adapter in adapterkit's terms.

    Attributes:
        config: the adapterkit config that expresses the foreign one exactly.
        head: ``add_adapter``'s head (``"classification"``, ``"token_classification"``) or None.
        labels: label names, in logit order (with a head).
        tensors: the ``TaskAdapter`` state dict (``layers.{i}.{position}.*``, ``layers.{i}.norms.*``,
            ``head.*``), complete: positions the source leaves unadapted hold identity weights.
        source: what it came from, for the artifact's metadata (``format``, ``library``, ``config``).
        name: the name the source gives it, if any.
    """

    config: AdapterConfig
    head: str | None
    labels: list[str]
    tensors: dict[str, torch.Tensor]
    source: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


def install(model: AdapterModel, converted: Converted, name: str, dtype: torch.dtype | None = None) -> str:
    """Add ``converted`` to ``model`` as adapter ``name``; on any mismatch nothing is left behind."""
    model._check_new_name(name)
    adapter = model.add_adapter(name, converted.config, head=converted.head, labels=converted.labels, dtype=dtype)
    try:
        expected = adapter.state_dict()
        missing = sorted(set(expected) - set(converted.tensors))
        unexpected = sorted(set(converted.tensors) - set(expected))
        if missing or unexpected:
            raise InteropError(f"converted tensors do not fit the adapter (missing {missing[:4]}, unexpected {unexpected[:4]})")
        wrong = [k for k, v in expected.items() if converted.tensors[k].shape != v.shape]
        if wrong:
            raise InteropError(
                "converted tensor shapes do not fit this model: "
                + "; ".join(f"{k} {tuple(converted.tensors[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:4])
            )
        cast = {k: t.to(expected[k].dtype) for k, t in converted.tensors.items()}
        bad = [k for k, t in cast.items() if not torch.isfinite(t).all()]  # after the cast: 1e300 is inf in fp32
        if bad:
            raise InteropError(f"converted tensor {bad[0]!r} holds values that are not finite in {expected[bad[0]].dtype}")
        adapter.load_state_dict(cast, strict=True)
    except Exception:
        model.delete_adapter(name)
        raise
    adapter.source = dict(converted.source)  # read by save_adapter's callers (convert records it)
    return name


def labels_for(model: AdapterModel, n: int, given: list[str] | None = None) -> list[str]:
    """Label names for an n-way head: ``given``, else the base config's ``id2label`` when it has n
    entries, else LABEL_0..LABEL_{n-1} (neither PEFT nor a bare head stores names)."""
    if given is not None:
        if len(given) != n:
            raise InteropError(f"{len(given)} labels given for a head with {n} outputs")
        return list(given)
    id2label = getattr(model.base.config, "id2label", None) or {}
    if len(id2label) == n:
        return [str(id2label[i]) if i in id2label else str(id2label[str(i)]) for i in range(n)]
    return [f"LABEL_{i}" for i in range(n)]


def load_weight_file(folder: Path, names: tuple[str, str]) -> dict[str, torch.Tensor]:
    """``names[0]`` (safetensors) if present, else ``names[1]`` (a ``.bin`` pickle) read only through
    ``torch.load(weights_only=True)``, from which nothing but a dict of tensors is accepted."""
    st, binary = folder / names[0], folder / names[1]
    if st.is_file():
        try:
            data = dict(load_file(str(st)))
        except Exception as e:  # safetensors' own error type for a truncated or garbled file, OSError, ...
            raise InteropError(f"{st}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        where = st
    elif binary.is_file():
        try:
            data = torch.load(str(binary), map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or garbled archive, or a pickle asking for more than tensors
            if "Weights only load failed" in str(e):  # torch's restricted unpickler said no
                raise InteropError(f"{binary}: refused by torch.load(weights_only=True): not a pickle of plain "
                                   "tensors (none of its code was run)") from None
            raise InteropError(f"{binary}: not a readable weights file ({type(e).__name__}: {str(e)[:120]})") from None
        where = binary
        if not isinstance(data, dict):
            raise InteropError(f"{binary}: not a dict of tensors")
    else:
        raise InteropError(f"{folder}: no {names[0]} (or {names[1]})")
    for key, t in data.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise InteropError(f"{where}: not a dict of named tensors (entry {str(key)[:80]!r})")
        if t.layout != torch.strided or not t.is_floating_point():
            raise InteropError(f"{where}: tensor {key[:80]!r} is {t.dtype} ({t.layout}); adapter weights are "
                               "dense floating-point tensors")
    return data


CONFIG_MAX_BYTES = 1 << 20  # a real adapter_config.json is a few KB: refuse before reading a huge one


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (at most ``CONFIG_MAX_BYTES``), or InteropError saying why not."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InteropError(f"{path} not found") from None
    if size > CONFIG_MAX_BYTES:
        raise InteropError(f"{path}: {size:,} bytes, more than the {CONFIG_MAX_BYTES:,} a config may have")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: not a JSON object")
    return data
