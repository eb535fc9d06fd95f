"""Property-based fuzzing (Hypothesis) of the hub's name, version and search-query parsing: any text
either parses into something that round-trips and is safe to use in a path, or is refused with
BadRequest. Nothing else may escape."""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from adapterkit.hub import BadRequest
from adapterkit.hub.names import (
    NAME_RE,
    VERSION_RE,
    canonical_version,
    parse_ref,
    validate_version,
    version_key,
)
from adapterkit.hub.query import SearchQuery

SETTINGS = settings(max_examples=400, deadline=None, database=None)
# Text that often looks like a reference: the name alphabet, separators, and hostile characters.
PIECES = st.sampled_from(
    ["a", "z", "0", "9", ".", "..", "_", "-", "/", "@", "hub:", "latest", "1", "1.0", "01", "\\", "~", "%2e",
     "\x00", "\n", "\u0435", "\u200b", "\ud800", "A", " ", "C:\\"]
)
REFS = st.one_of(st.text(max_size=80), st.lists(PIECES, max_size=12).map("".join))


@SETTINGS
@given(REFS)
@example("hub:team/m@1.0.0")
@example("../../etc/passwd")
@example("team/m@latest")
def test_parse_ref_accepts_only_safe_names_and_round_trips(text: str) -> None:
    try:
        ref = parse_ref(text)
    except BadRequest as e:
        assert str(e) and len(str(e)) < 1000  # a reason, never the whole input
        return
    for part in (ref.namespace, ref.name):
        assert NAME_RE.match(part) and ".." not in part and "/" not in part
    if ref.version not in (None, "latest"):
        assert VERSION_RE.match(ref.version) and canonical_version(ref.version) == ref.version
    assert parse_ref(str(ref)) == ref


@SETTINGS
@given(st.lists(st.integers(0, 10**9 - 1), min_size=1, max_size=3))
def test_versions_have_one_spelling_and_keep_their_order(parts: list[int]) -> None:
    text = ".".join(str(p) for p in parts)
    canonical = validate_version(text)
    assert validate_version(canonical) == canonical  # idempotent
    assert version_key(canonical) == version_key(text)
    assert validate_version(text + ".0" * (3 - len(parts))) == canonical  # 1 == 1.0 == 1.0.0
    assert not re.search(r"\.0$", canonical) or canonical == "0"


@SETTINGS
@given(st.dictionaries(st.sampled_from(["q", "base_id", "model_type", "task_type", "kind", "name_or_path", "limit", "x"]), st.text(max_size=300)))
def test_search_query_from_any_params(params: dict[str, str]) -> None:
    try:
        query = SearchQuery.from_params(params)
    except BadRequest:
        return
    assert 1 <= query.limit <= 1000
    assert SearchQuery.from_params(query.to_params()) == query  # the HTTP form round-trips
