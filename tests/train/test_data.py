"""Reading tasks: formats, task types, label names, sub-word alignment, and exact error messages."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from adapterkit.data import DataError, EncodedTask, collate, load_task, stratified_sample, stratified_split


def test_csv_tsv_jsonl_read_the_same_task(tmp_path):
    rows = [("a good film", "pos"), ("an awful plot", "neg"), ("it was fine", "pos")]
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    (tmp_path / "t.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    for name in ("t.csv", "t.tsv", "t.jsonl"):
        data = load_task(tmp_path / name)
        assert data.task_type == "classification"
        assert data.labels == ["neg", "pos"]
        assert [(e.text, data.labels[e.label]) for e in data.examples] == rows
    assert load_task(tmp_path / "t.csv").examples[1].where == f"{tmp_path / 't.csv'}:3"


def test_integer_labels_sort_numerically_and_given_labels_fix_the_order(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"x{i}", "label": y}) + "\n" for i, y in enumerate([10, 2, 1])))
    assert load_task(path).labels == ["1", "2", "10"]
    assert [e.label for e in load_task(path, labels=["10", "2", "1"]).examples] == [0, 1, 2]


def test_pair_task(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"premise": "a dog runs", "hypothesis": "an animal moves", "label": "entail"}) + "\n")
    data = load_task(path, text_column="premise", text_pair_column="hypothesis")
    assert data.task_type == "pair_classification"
    assert (data.examples[0].text, data.examples[0].text_pair) == ("a dog runs", "an animal moves")


def test_token_task_labels_go_on_the_first_sub_word(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    path = tmp_path / "pos.jsonl"
    path.write_text(json.dumps({"tokens": ["the", "dog", "walked"], "tags": ["DET", "NOUN", "VERB"]}) + "\n")
    data = load_task(path)
    assert data.task_type == "token_classification" and data.labels == ["DET", "NOUN", "VERB"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    item = EncodedTask(data, tokenizer)[0]
    assert tokenizer.convert_ids_to_tokens(item["input_ids"]) == ["[CLS]", "the", "dog", "walk", "##ed", "[SEP]"]
    assert item["labels"] == [-100, 0, 1, 2, -100, -100]
    batch = collate([item, {**item, "input_ids": item["input_ids"][:3], "attention_mask": [1, 1, 1], "labels": [-100, 0, 1]}])
    assert batch["labels"].tolist()[1] == [-100, 0, 1, -100, -100, -100]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0]


def test_token_task_from_csv_space_separated(tmp_path):
    path = tmp_path / "pos.csv"
    path.write_text("tokens,tags\nthe dog,DET NOUN\n")
    data = load_task(path)
    assert data.examples[0].text == ["the", "dog"] and data.examples[0].label == [0, 1]


def test_datasets_folder_keeps_class_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=features),
        "validation": datasets.Dataset.from_dict({"text": ["ok"], "label": [1]}, features=features),
    })
    ds.save_to_disk(str(tmp_path / "ds"))
    train = load_task(tmp_path / "ds")
    assert train.labels == ["neg", "pos"] and [e.label for e in train.examples] == [1, 0, 1]
    assert len(load_task(tmp_path / "ds", split="validation", labels=train.labels)) == 1
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, validation\)"):
        load_task(tmp_path / "ds", split="test")


def _error(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_task(path, **kwargs)
    return str(info.value)


def test_missing_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("sentence,label\nhello,pos\n")
    assert _error(path) == f"{path}:2: missing column 'text' (columns: sentence, label)"


def test_empty_text_names_the_line_even_after_a_multi_line_field(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"two\nlines",pos\n  ,neg\n')
    assert _error(path) == f"{path}:4: empty text in column 'text'"


def test_unknown_label_in_evaluation_split(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "pos"}) + "\n" + json.dumps({"text": "b", "label": "meh"}) + "\n")
    assert _error(path, labels=["neg", "pos"]) == f"{path}:2: unknown label 'meh' (the task's labels are: neg, pos)"


def test_wrong_encoding(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_bytes("text\tlabel\nfine\tpos\ncaf\u00e9\tpos\n".encode("latin-1"))
    assert _error(path) == (
        f"{path}:3: not valid utf-8 text (byte 0xe9 at column 4); "
        "give the file's encoding (e.g. encoding='latin-1', --encoding latin-1)"
    )
    assert load_task(path, encoding="latin-1").examples[1].text == "caf\u00e9"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": "x"}\n{"text": "b", "label"\n', "2: not valid JSON: Expecting ':' delimiter"),
        ('["a", "x"]\n', "1: expected a JSON object, got list"),
        ('{"text": "a", "label": ""}\n', "1: empty label"),
        ('{"tokens": ["a", "b"], "tags": ["X"]}\n', "1: 2 tokens but 1 tags"),
        ('{"tokens": [], "tags": []}\n', "1: empty token list in column 'tokens'"),
        ("", " no examples"),
    ],
)
def test_other_bad_lines(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    assert _error(path) == f"{path}:{message}" if not message.startswith(" ") else f"{path}:{message}"


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\na,pos,extra\n")
    assert _error(path) == f"{path}:2: 3 fields but the header has 2"


def test_unknown_file_type_and_missing_source(tmp_path):
    (tmp_path / "t.xml").write_text("<x/>")
    assert _error(tmp_path / "t.xml") == f"{tmp_path / 't.xml'}: unknown file type '.xml'; expected .csv, .tsv or .jsonl, or a datasets folder"
    assert _error(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file or folder"


def test_stratified_split_is_seeded_disjoint_and_keeps_proportions():
    labels = ["a"] * 80 + ["b"] * 20
    train, val, test = stratified_split(labels, [0.8, 0.1, 0.1], seed=3)
    assert sorted(train + val + test) == list(range(100))
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert Counter(labels[i] for i in val) == {"a": 8, "b": 2}
    assert stratified_split(labels, [0.8, 0.1, 0.1], seed=3) == [train, val, test]
    assert stratified_split(labels, [0.8, 0.1, 0.1], seed=4) != [train, val, test]
    sample = stratified_sample(labels, 10, seed=0)
    assert len(sample) == 10 and Counter(labels[i] for i in sample) == {"a": 8, "b": 2}
