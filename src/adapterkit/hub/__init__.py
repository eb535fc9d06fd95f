"""The adapterkit hub: publish, find, version and download adapter artifacts.

    from adapterkit.hub import LocalRegistry, resolve_reference
    reg = LocalRegistry("/tmp/hub")                     # or RemoteRegistry("http://127.0.0.1:8765", token)
    reg.publish("sentiment.safetensors", "team/sentiment", metrics={"accuracy": 0.91})
    path = resolve_reference("hub:team/sentiment@1")    # a local file, sha256-verified

``RemoteRegistry`` (needs httpx) and the server (needs fastapi, uvicorn) are imported only when used.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    BadRequest,
    Conflict,
    Forbidden,
    HubError,
    IntegrityError,
    InvalidArtifact,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from .names import Ref, parse_ref
from .registry import AdapterVersion, LocalRegistry, Registry, default_home
from .resolve import open_registry, resolve_reference

__all__ = [
    "AdapterVersion",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "HubError",
    "IntegrityError",
    "InvalidArtifact",
    "LocalRegistry",
    "NotFound",
    "Ref",
    "Registry",
    "RemoteRegistry",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "default_home",
    "open_registry",
    "parse_ref",
    "resolve_reference",
]


def __getattr__(name: str) -> Any:
    if name == "RemoteRegistry":
        from .client import RemoteRegistry

        return RemoteRegistry
    raise AttributeError(f"module 'adapterkit.hub' has no attribute {name!r}")
