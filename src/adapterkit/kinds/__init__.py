"""The kind registry: one module per adapter kind in this package, each defining ``KIND``.

Adding a kind is one new module here (found by name, nothing to register by hand) defining
``KIND = AdapterKind(...)``; see ``interface.py`` for what a kind declares and ``bottleneck.py`` for
the maths the bottleneck kinds share. Modules without ``KIND`` (``interface``, ``bottleneck``) are the
kinds' building blocks.
"""

from __future__ import annotations

import importlib
import pkgutil

from .interface import POSITIONS, AdapterKind, Position, SiteModule


def _discover() -> dict[str, AdapterKind]:
    found: list[AdapterKind] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        kind = getattr(importlib.import_module(f"{__name__}.{info.name}"), "KIND", None)
        if isinstance(kind, AdapterKind):
            found.append(kind)
    found.sort(key=lambda k: (k.order, k.name))
    names = [k.name for k in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuntimeError(f"adapter kind(s) defined twice in adapterkit.kinds: {', '.join(duplicates)}")
    return {k.name: k for k in found}


KINDS: dict[str, AdapterKind] = _discover()


def get_kind(name: str) -> AdapterKind:
    """The registered kind called ``name``; ValueError naming the known ones otherwise."""
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"AdapterConfig.kind must be one of {', '.join(KINDS)}; got {name!r}")
    return kind


__all__ = ["KINDS", "POSITIONS", "AdapterKind", "Position", "SiteModule", "get_kind"]
