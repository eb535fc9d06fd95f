"""From a reference string to a registry and a verified local file."""

from __future__ import annotations

import os
from pathlib import Path

from .names import HUB_PREFIX, parse_ref
from .registry import LocalRegistry, Registry


def open_registry(spec: str | os.PathLike | None = None, token: str | None = None) -> Registry:
    """A registry from a URL (``RemoteRegistry``) or a folder (``LocalRegistry``).

    ``spec`` defaults to ``$ADAPTERKIT_REGISTRY``, then to the default LocalRegistry; ``token`` to
    ``$ADAPTERKIT_TOKEN``.
    """
    spec = spec if spec not in (None, "") else os.environ.get("ADAPTERKIT_REGISTRY") or None
    if spec is not None and str(spec).startswith(("http://", "https://")):
        from .client import RemoteRegistry  # needs httpx, only for remote use

        return RemoteRegistry(str(spec), token=token or os.environ.get("ADAPTERKIT_TOKEN") or None)
    return LocalRegistry(spec)


def resolve_reference(ref: str) -> Path:
    """Turn ``"hub:team/name@1"`` (or ``@latest``, or no version) into a local file verified against
    its sha256, from the registry named by ``$ADAPTERKIT_REGISTRY`` (URL or folder) or the default one.
    """
    target = parse_ref(ref)  # validates before any registry is touched
    registry = open_registry()
    try:
        return registry.download(str(target))
    finally:
        close = getattr(registry, "close", None)
        if close is not None:
            close()


__all__ = ["HUB_PREFIX", "open_registry", "resolve_reference"]
