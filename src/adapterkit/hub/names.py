"""Adapter references ``namespace/name[@version]``: parsing and strict validation.

Names reach SQL, URLs and (in the download cache) file paths, so they are held to a small ASCII
alphabet and every rejection says exactly why.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

HUB_PREFIX = "hub:"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
NAME_MAX = 64
# Dotted numbers so that "latest" has an order to follow: 1 < 1.2 < 2 < 10.
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,2}$")
LATEST = "latest"
NAME_RULE = "lowercase ASCII letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters"


@dataclass(frozen=True)
class Ref:
    """A parsed reference; ``version`` is None (no version given), ``"latest"`` or a dotted number."""

    namespace: str
    name: str
    version: str | None = None

    @property
    def adapter(self) -> str:
        """``namespace/name`` without the version."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.adapter if self.version is None else f"{self.adapter}@{self.version}"

    def with_version(self, version: str | None) -> Ref:
        return Ref(self.namespace, self.name, version)


def has_surrogate(value: Any, depth: int = 0) -> bool:
    """True when a string anywhere in a JSON-like value holds a lone UTF-16 surrogate (or the value
    is nested deeper than 64 levels, which no legitimate document here is)."""
    if depth > 64:
        return True
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, dict):
        return any(has_surrogate(k, depth + 1) or has_surrogate(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_surrogate(v, depth + 1) for v in value)
    return False


def _odd_character(text: str) -> str | None:
    for ch in text:
        if ord(ch) > 127 or not ch.isprintable():
            label = unicodedata.name(ch, "control character")
            return f"{ch!r} (U+{ord(ch):04X} {label})"
    return None


def shown(text: str, limit: int = 80) -> str:
    """``repr(text)``, cut to ``limit`` characters: an error message never echoes a whole long input."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def validate_name(part: str, what: str = "name") -> str:
    """Return ``part`` if it is a valid namespace or adapter name, else raise BadRequest saying why."""
    if not isinstance(part, str) or part == "":
        raise BadRequest(f"{what} is empty; use {NAME_RULE}")
    odd = _odd_character(part)
    if odd:
        raise BadRequest(f"{what} {shown(part)} contains the character {odd}; use {NAME_RULE}")
    if len(part) > NAME_MAX:
        raise BadRequest(f"{what} is {len(part)} characters long; at most {NAME_MAX} are allowed")
    if part in (".", "..") or ".." in part:
        raise BadRequest(f"{what} {part!r} contains '..'; path segments are not allowed in names")
    if not NAME_RE.match(part):
        raise BadRequest(f"{what} {part!r} is not allowed; use {NAME_RULE}")
    return part


def canonical_version(version: str) -> str:
    """A version without trailing ``.0`` parts: ``1.0.0`` and ``1.0`` are ``1``, ``1.2.0`` is ``1.2``.

    One version has one spelling, so ``team/m@1`` and ``team/m@1.0`` can never be two different
    published versions (or two cache entries for one).
    """
    parts = version.split(".")
    while len(parts) > 1 and parts[-1] == "0":
        parts.pop()
    return ".".join(parts)


def validate_version(version: str, allow_latest: bool = True) -> str:
    """Return the canonical form of ``version`` if valid (``1``, ``1.2``, ``1.2.3``; ``1.0`` -> ``1``),
    or ``latest`` when allowed."""
    if version == LATEST:
        if allow_latest:
            return version
        raise BadRequest("'latest' is not a version you can publish; give a number like 1 or 1.2, or none")
    if not isinstance(version, str) or version == "":
        raise BadRequest("version is empty; use a number like 1, 1.2 or 1.2.3, or 'latest'")
    odd = _odd_character(version)
    if odd or not VERSION_RE.match(version):
        raise BadRequest(f"version {shown(version)} is not valid; use a number like 1, 1.2 or 1.2.3 (no 'v', no leading zeros)")
    return canonical_version(version)


def version_key(version: str) -> tuple[int, ...]:
    """Sort key: numeric per part, so 10 > 9 and 1.2 > 1; ``1.0`` sorts equal to ``1``."""
    return tuple(int(p) for p in canonical_version(version).split("."))


def parse_ref(text: str, *, allow_version: bool = True, allow_latest: bool = True) -> Ref:
    """Parse ``[hub:]namespace/name[@version]`` strictly.

    >>> parse_ref("hub:team/sms-spam@1")
    Ref(namespace='team', name='sms-spam', version='1')
    """
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("adapter reference is empty; expected 'namespace/name' or 'namespace/name@version'")
    raw = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text
    if raw.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:[\\/]", raw):
        raise BadRequest(f"{shown(text)} looks like a file path, not an adapter reference 'namespace/name[@version]'")
    base, sep, version = raw.partition("@")
    if sep and not allow_version:
        raise BadRequest(f"{shown(text)}: a version is not allowed here")
    parts = base.split("/")
    if len(parts) != 2:
        raise BadRequest(
            f"adapter reference {shown(text)} must have exactly one '/': 'namespace/name' or 'namespace/name@version'"
        )
    namespace = validate_name(parts[0], "namespace")
    name = validate_name(parts[1], "adapter name")
    if sep:
        version = validate_version(version, allow_latest=allow_latest)
        return Ref(namespace, name, version)
    return Ref(namespace, name, None)
