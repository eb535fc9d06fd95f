"""Reference parsing: what is accepted, and that every rejection says why."""

from __future__ import annotations

import pytest

from adapterkit.hub import BadRequest, Ref, parse_ref
from adapterkit.hub.names import version_key

GOOD = [
    ("team/sms-spam", Ref("team", "sms-spam", None)),
    ("hub:team/sms-spam@1", Ref("team", "sms-spam", "1")),
    ("hub:team/sms-spam@latest", Ref("team", "sms-spam", "latest")),
    ("a/b@1.2.3", Ref("a", "b", "1.2.3")),
    ("0rg/x_y.z-1@10", Ref("0rg", "x_y.z-1", "10")),
    (f"{'n' * 64}/{'m' * 64}", Ref("n" * 64, "m" * 64, None)),
]

BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("team", "exactly one '/'"),
    ("team/a/b", "exactly one '/'"),
    ("/etc/passwd", "looks like a file path"),
    ("hub:/etc/passwd", "looks like a file path"),
    ("~/x/y", "looks like a file path"),
    ("C:\\x/y", "looks like a file path"),
    ("../x", "contains '..'"),
    ("team/..", "contains '..'"),
    ("team/a..b", "contains '..'"),
    ("team/", "adapter name is empty"),
    ("/x", "looks like a file path"),
    ("Team/x", "not allowed"),
    ("team/.hidden", "not allowed"),
    ("team/-x", "not allowed"),
    ("team/a b", "not allowed"),
    ("team/a\\b", "not allowed"),
    (f"team/{'a' * 65}", "65 characters long"),
    ("team/s\u0435ntiment", "CYRILLIC"),
    ("team/x\u200b", "ZERO WIDTH SPACE"),
    ("team/x\x00", "control character"),
    ("te\u0301am/x", "COMBINING ACUTE ACCENT"),
    ("team/x@", "version is empty"),
    ("team/x@v1", "not valid"),
    ("team/x@01", "not valid"),
    ("team/x@1.2.3.4", "not valid"),
    ("team/x@1@2", "not valid"),
]


@pytest.mark.parametrize(("text", "ref"), GOOD)
def test_good_references_parse(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref
    assert parse_ref(str(ref)) == ref


@pytest.mark.parametrize(("text", "why"), BAD)
def test_bad_references_are_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(BadRequest, match=None) as e:
        parse_ref(text)
    assert why in str(e.value)


def test_latest_cannot_be_published_and_versions_sort_numerically() -> None:
    with pytest.raises(BadRequest, match="'latest' is not a version you can publish"):
        parse_ref("team/x@latest", allow_latest=False)
    assert sorted(["10", "9", "1.2", "1", "2.0.1"], key=version_key) == ["1", "1.2", "2.0.1", "9", "10"]
