"""The hub's exceptions. Each carries the HTTP status the server answers with, so the server and the
HTTP client map between exceptions and responses by one table instead of per endpoint."""

from __future__ import annotations


class HubError(Exception):
    """Base class of every error the hub reports; ``str(e)`` is a one-line message for people."""

    status = 400


class BadRequest(HubError):
    """A malformed request: a bad name, version, JSON document or parameter."""


class InvalidArtifact(HubError):
    """An uploaded file that is not a usable adapterkit artifact."""

    status = 422


class NotFound(HubError):
    """No such adapter or version (or it was deleted)."""

    status = 404


class Conflict(HubError):
    """The version already exists (versions are immutable) or was deleted and cannot be reused."""

    status = 409


class Unauthorized(HubError):
    """A missing, unknown or revoked token."""

    status = 401


class Forbidden(HubError):
    """A valid token that may not write into this namespace."""

    status = 403


class TooLarge(HubError):
    """An upload over the server's size limit."""

    status = 413


class Unavailable(HubError):
    """The hub server cannot be reached."""

    status = 503


class IntegrityError(HubError):
    """Stored or downloaded bytes whose sha256 is not the one on record."""

    status = 500


ERRORS_BY_STATUS: dict[int, type[HubError]] = {
    cls.status: cls for cls in (BadRequest, InvalidArtifact, NotFound, Conflict, Unauthorized, Forbidden, TooLarge)
}


def error_for_status(status: int, message: str) -> HubError:
    """The exception that a response with this status and message stands for."""
    return ERRORS_BY_STATUS.get(status, HubError)(message)
