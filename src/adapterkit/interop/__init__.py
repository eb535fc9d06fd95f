"""Other libraries' adapter checkpoints, in and out: PEFT folders and the adapters library's (AdapterHub).

``read_foreign(path, model)`` recognises a saved folder by its ``adapter_config.json`` and translates
it into adapterkit's terms (``Converted``) for that model; ``load_foreign`` also adds it to the model
(``AdapterModel.load_adapter`` calls it for such folders). ``export(model, name, out, to=...)`` writes
an adapter the other way. Only exact translations are made: an option or tensor with no exact
equivalent raises ``InteropError`` naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .converted import Converted, install
from .module_map import InteropError

if TYPE_CHECKING:
    import torch

    from ..model import AdapterModel

FORMATS = ("peft", "adapters")


def detect_format(path: str | os.PathLike) -> str | None:
    """``"peft"`` or ``"adapters"`` for a folder one of those libraries saved; None otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    from . import adapters_format, peft_format

    if peft_format.is_peft_folder(folder):
        return "peft"
    if adapters_format.is_adapters_folder(folder):
        return "adapters"
    return None


def read_foreign(path: str | os.PathLike, model: AdapterModel, labels: list[str] | None = None) -> Converted:
    """Translate a PEFT or adapters-library folder into adapterkit's terms for ``model``."""
    fmt = detect_format(path)
    if fmt == "peft":
        from .peft_format import read_peft

        return read_peft(path, model, labels)
    if fmt == "adapters":
        from .adapters_format import read_adapters

        return read_adapters(path, model, labels)
    raise InteropError(f"{path}: not a PEFT or adapters-library folder (no adapter_config.json of either)")


def load_foreign(
    path: str | os.PathLike,
    model: AdapterModel,
    name: str | None = None,
    labels: list[str] | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Read a foreign folder and add it to ``model`` (as ``name``; default: the name it was saved under,
    else the folder's name). Returns the adapter's name."""
    converted = read_foreign(path, model, labels)
    name = name or converted.name or Path(path).resolve().name
    return install(model, converted, name, dtype=dtype)


def export(model: AdapterModel, name: str, out: str | os.PathLike, to: str) -> Path:
    """Write adapter ``name`` of ``model`` as a folder of format ``to`` (``"peft"`` or ``"adapters"``)."""
    if to == "peft":
        from .peft_format import write_peft

        return write_peft(model, name, out)
    if to == "adapters":
        from .adapters_format import write_adapters

        return write_adapters(model, name, out)
    raise InteropError(f"export format must be one of {', '.join(FORMATS)}; got {to!r}")


__all__ = ["FORMATS", "Converted", "InteropError", "detect_format", "export", "install", "load_foreign", "read_foreign"]
