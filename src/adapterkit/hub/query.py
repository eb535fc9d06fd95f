"""``SearchQuery``: the one description of a hub search, shared by every registry, the server, the
HTTP client, the command line and the web page.

A filter added here reaches all of them: ``FILTERS`` names the exact-match columns, ``to_params`` /
``from_params`` are the HTTP query string, ``matches`` is the text and model-id matching that every
backend applies to the rows its exact filters selected.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import BadRequest
from .names import has_surrogate

if TYPE_CHECKING:  # pragma: no cover
    from .registry import AdapterVersion

# Exact-match filters: query field == the version's field of the same name.
FILTERS = ("base_id", "model_type", "task_type", "kind")
TEXT_MAX = 200  # a search text or filter value longer than this cannot match anything real
LIMIT_DEFAULT = 100
LIMIT_MAX = 1000


def _clean(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"search {what} must be a string, got {type(value).__name__}")
    if len(value) > TEXT_MAX:
        raise BadRequest(f"search {what} is {len(value)} characters long; at most {TEXT_MAX} are allowed")
    if not value.isprintable() or has_surrogate(value):
        raise BadRequest(f"search {what} contains control characters or lone surrogates")
    return value


@dataclass(frozen=True)
class SearchQuery:
    """What to look for. Every field is optional; ``None`` means "any".

    ``text``: words that must all appear in the name, description, task, labels or base model;
    ``name_or_path``: a base model id, matched with or without its organisation
    (``bert-base-uncased`` matches ``google/bert-base-uncased``); the ``FILTERS`` match exactly.
    """

    text: str | None = None
    base_id: str | None = None
    model_type: str | None = None
    task_type: str | None = None
    kind: str | None = None
    name_or_path: str | None = None
    limit: int = LIMIT_DEFAULT

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "limit":
                object.__setattr__(self, f.name, _clean(getattr(self, f.name), f.name))
        limit = self.limit
        if isinstance(limit, str) and limit.isdigit():
            limit = int(limit)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIMIT_MAX:
            raise BadRequest(f"search limit must be a whole number from 1 to {LIMIT_MAX}, got {str(self.limit)[:20]!r}")
        object.__setattr__(self, "limit", limit)

    @classmethod
    def of(cls, query: SearchQuery | str | None = None, **filters: Any) -> SearchQuery:
        """A query from what ``Registry.search`` accepts: a ``SearchQuery``, or a text plus keyword
        filters (``search("spam", kind="houlsby")``). Filters given with a query replace its fields."""
        if isinstance(query, SearchQuery):
            return replace(query, **filters) if filters else query
        unknown = sorted(set(filters) - {f.name for f in fields(cls)} - {"text"})
        if unknown:
            raise TypeError(f"unknown search filter(s): {', '.join(unknown)}")
        if "limit" in filters and filters["limit"] is None:
            del filters["limit"]
        return cls(text=query, **filters) if query is not None else cls(**filters)

    def filters(self) -> dict[str, str]:
        """The exact-match filters that are set: column -> value."""
        return {k: getattr(self, k) for k in FILTERS if getattr(self, k)}

    def to_params(self) -> dict[str, str]:
        """The HTTP query string (``q`` is the text); fields left at "any" are left out."""
        params = {"q": self.text, **self.filters(), "name_or_path": self.name_or_path}
        out = {k: v for k, v in params.items() if v}
        if self.limit != LIMIT_DEFAULT:
            out["limit"] = str(self.limit)
        return out

    @classmethod
    def from_params(cls, params: Any) -> SearchQuery:
        """From an HTTP query string mapping (``q``, the filters, ``name_or_path``, ``limit``)."""
        known = {"q", "limit", "name_or_path", *FILTERS}
        values = {k: params.get(k) for k in known}
        limit = values.pop("limit")
        return cls(
            text=values.pop("q"),
            limit=LIMIT_DEFAULT if limit in (None, "") else limit,
            **values,
        )

    def matches(self, version: AdapterVersion) -> bool:
        """Whether ``version`` passes every filter (backends may pre-select by ``filters()`` in their
        own store, then call this for the rest)."""
        for key, want in self.filters().items():
            if getattr(version, key) != want:
                return False
        if self.name_or_path:
            want = self.name_or_path.lower()
            have = version.name_or_path.lower()
            if have != want and not have.endswith("/" + want):
                return False
        if self.text:
            haystack = search_text(version)
            if not all(w in haystack for w in self.text.lower().split()):
                return False
        return True


def search_text(v: AdapterVersion) -> str:
    """What the search text is matched against, lower-cased."""
    parts = [v.adapter, v.description, v.task_type, v.model_type, v.kind, v.base_id, v.name_or_path, " ".join(v.labels)]
    return " ".join(parts).lower()


__all__ = ["FILTERS", "LIMIT_DEFAULT", "LIMIT_MAX", "SearchQuery", "search_text"]
