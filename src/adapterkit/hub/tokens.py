"""Publishing tokens for the hub server, kept in the registry's index, hashed.

A token is ``akt_<id>_<secret>``; only the sha256 of the whole token is stored (the secret is 256
random bits, so a fast hash is enough: there is nothing to brute-force). A token belongs to an owner,
and an owner owns every namespace they published into first.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from .errors import NotFound, Unauthorized
from .names import validate_name
from .registry import IndexedRegistry

TOKEN_RE = re.compile(r"^akt_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class TokenInfo:
    id: str
    owner: str
    created: float
    revoked: float | None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Create, revoke and check tokens in a registry's index."""

    def __init__(self, registry: IndexedRegistry):
        self.registry = registry

    def create(self, owner: str) -> tuple[TokenInfo, str]:
        """A new token for ``owner``; the token text is returned once and never stored."""
        validate_name(owner, "owner")
        token_id = secrets.token_hex(6)
        token = f"akt_{token_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        with self.registry._write() as db:
            db.execute("INSERT INTO tokens (id, hash, owner, created) VALUES (?, ?, ?, ?)", (token_id, _hash(token), owner, now))
        return TokenInfo(token_id, owner, now, None), token

    def revoke(self, token_or_id: str) -> TokenInfo:
        """Revoke by token text or by its id (the 12 hex digits after ``akt_``)."""
        m = TOKEN_RE.match(token_or_id)
        token_id = m.group(1) if m else token_or_id
        with self.registry._write() as db:
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"no token with id {token_id!r}")
            revoked = row["revoked"] or time.time()
            db.execute("UPDATE tokens SET revoked = ? WHERE id = ?", (revoked, token_id))
        return TokenInfo(row["id"], row["owner"], row["created"], revoked)

    def list(self) -> list[TokenInfo]:
        with self.registry._read() as db:
            rows = db.execute("SELECT id, owner, created, revoked FROM tokens ORDER BY created").fetchall()
        return [TokenInfo(r["id"], r["owner"], r["created"], r["revoked"]) for r in rows]

    def owner_of(self, token: str | None) -> str:
        """The owner of a valid token; Unauthorized saying why otherwise."""
        if not token:
            raise Unauthorized("publishing needs a token: send 'Authorization: Bearer <token>' (create one with 'adapterkit hub token create')")
        m = TOKEN_RE.match(token)
        if not m:
            raise Unauthorized("the token is not valid (malformed); tokens look like akt_<12 hex>_<43 characters>")
        with self.registry._read() as db:
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (m.group(1),)).fetchone()
        if row is None or not hmac.compare_digest(row["hash"], _hash(token)):
            raise Unauthorized("the token is not valid (unknown to this server)")
        if row["revoked"] is not None:
            raise Unauthorized(f"the token {row['id']} was revoked")
        return row["owner"]
