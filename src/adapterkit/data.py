"""Reading one task's labelled examples: CSV, TSV, JSON Lines, or a Hugging Face ``datasets`` dataset.

The task types with a head (``tasks.TASKS``; a record's ``pair`` and ``labels`` say how its examples
look), today:

- ``classification``: one text and one label per example;
- ``pair_classification``: two texts (``text``, ``text_pair``) and one label;
- ``token_classification``: a list of tokens and one tag per token.

Every problem is an error naming the file and line (``path:line: ...``); no example is ever skipped
silently. Labels are kept as names; their order (the head's logit order) comes from the training split
and is passed to the other splits, where an unseen label is an error.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .tasks import HEAD_TYPES, TASKS

# Task types read from labelled examples: those with a head of their own.
TASK_TYPES: tuple[str, ...] = HEAD_TYPES
_FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


class DataError(ValueError):
    """Bad task data; the message names the file and line."""


@dataclass
class Example:
    """One labelled example.

    ``text`` is a string, or a list of tokens for token classification; ``label`` is a label index, or
    one tag index per token. ``where`` is ``file:line`` (or ``dataset[row]``) for error messages.
    """

    text: str | list[str]
    label: int | list[int]
    text_pair: str | None = None
    where: str = ""


@dataclass
class TaskData:
    """One split of a task: its examples, task type and label names (in logit order)."""

    task_type: str
    labels: list[str]
    examples: list[Example] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def label_ids(self) -> list[int]:
        """One label per example (for stratifying); token tasks get 0."""
        return [e.label if isinstance(e.label, int) else 0 for e in self.examples]

    def subset(self, indices: Sequence[int]) -> TaskData:
        return TaskData(self.task_type, list(self.labels), [self.examples[i] for i in indices], self.source)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def load_task(
    source: str | Path,
    *,
    task_type: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    tokens_column: str = "tokens",
    tags_column: str = "tags",
    labels: Sequence[str] | None = None,
    split: str = "train",
    encoding: str = "utf-8",
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
) -> TaskData:
    """Read one split of a task.

    Args:
        source: a ``.csv`` / ``.tsv`` (header row), ``.jsonl`` (one JSON object a line) file; a folder
            saved by ``datasets`` (``save_to_disk``); or anything ``datasets.load_dataset`` takes
            (a hub id where a network exists, a builder name).
        task_type: one of TASK_TYPES; default: token classification when the tokens column exists,
            pair classification when ``text_pair_column`` is given, else classification.
        text_pair_column: the second text of a pair task (default ``text_pair`` for pair tasks).
        labels: the label names in logit order, from the training split; a label outside them is an
            error. Default: the labels found here, sorted (numerically when all are integers).
        split: the split to read from a ``datasets`` dataset or dict.
        encoding: text encoding of CSV / TSV / JSON Lines files.
        prompt_column, response_column, messages_column: for the generative types (``causal_lm``,
            ``seq2seq``; ``causal_lm.load_lm_task``): prompt/response pairs (or, for ``causal_lm``,
            chats) from a CSV / TSV / JSON Lines file.
    """
    generative = TASKS.get(task_type) if isinstance(task_type, str) else None
    if generative is not None and generative.generative:
        from .causal_lm import load_lm_task

        return load_lm_task(source, prompt_column=prompt_column, response_column=response_column,
                            messages_column=messages_column, encoding=encoding, task_type=task_type,
                            chats=generative.generation == "causal")
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
    path = Path(source)
    class_names: dict[str, list[str]] = {}
    if path.is_file():
        fmt = _FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .csv, .tsv or .jsonl, or a datasets folder")
        rows = _read_jsonl(path, encoding) if fmt == "jsonl" else _read_delimited(path, encoding, "\t" if fmt == "tsv" else ",")
        where_name = str(path)
    else:
        rows, class_names, where_name = _read_hf(str(source), split)
    rows = list(rows)
    if not rows:
        raise DataError(f"{where_name}: no examples")
    columns = rows[0][1]
    if task_type is None:
        task_type = _guess_task_type(per_word=tokens_column in columns, pair=text_pair_column is not None)
    task = TASKS[task_type]
    per_word = task.labels == "word"
    if task.pair and text_pair_column is None:
        text_pair_column = "text_pair"
    if per_word:
        wanted = [tokens_column, tags_column]
    else:
        wanted = [text_column, label_column] + ([text_pair_column] if task.pair else [])
    label_key = tags_column if per_word else label_column
    names = class_names.get(label_key)

    raw: list[tuple[str, Any, Any, Any]] = []  # (where, text, pair, label)
    for where, row in rows:
        for col in wanted:
            if col not in row:
                have = ", ".join(str(c) for c in row) or "none"
                raise DataError(f"{where}: missing column {col!r} (columns: {have})")
        if per_word:
            tokens, tags = _as_list(row[tokens_column], where, tokens_column), _as_list(row[tags_column], where, tags_column)
            if not tokens:
                raise DataError(f"{where}: empty token list in column {tokens_column!r}")
            if any(not str(t).strip() for t in tokens):
                raise DataError(f"{where}: empty token in column {tokens_column!r}")
            if len(tokens) != len(tags):
                raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
            raw.append((where, [str(t) for t in tokens], None, [_label_name(t, names, where) for t in tags]))
        else:
            text = _text(row[text_column], where, text_column)
            pair = _text(row[text_pair_column], where, text_pair_column) if task.pair else None
            raw.append((where, text, pair, _label_name(row[label_column], names, where)))

    if labels is None:
        labels = names if names is not None else _sorted_labels(
            {t for r in raw for t in (r[3] if isinstance(r[3], list) else [r[3]])}
        )
    labels = [str(x) for x in labels]
    index = {name: i for i, name in enumerate(labels)}

    def lookup(name: str, where: str) -> int:
        if name not in index:
            shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
            raise DataError(f"{where}: unknown label {name!r} (the task's labels are: {shown})")
        return index[name]

    examples = []
    for where, text, pair, label in raw:
        y = [lookup(t, where) for t in label] if isinstance(label, list) else lookup(label, where)
        examples.append(Example(text=text, text_pair=pair, label=y, where=where))
    return TaskData(task_type, labels, examples, where_name)


def _guess_task_type(per_word: bool, pair: bool) -> str:
    """The labelled task type whose examples look like these: a tokens column means one tag per word,
    a pair column two texts per example."""
    for name in TASK_TYPES:
        task = TASKS[name]
        if (task.labels == "word") == per_word and (task.pair == pair or per_word):
            return name
    raise DataError(f"no task type reads {'tagged words' if per_word else 'text pairs' if pair else 'texts'}")


def _text(value: Any, where: str, column: str) -> str:
    if value is None or not isinstance(value, str | int | float) or not str(value).strip():
        raise DataError(f"{where}: empty text in column {column!r}")
    return str(value)


def _as_list(value: Any, where: str, column: str) -> list[Any]:
    if isinstance(value, str):  # CSV / TSV cells: space-separated
        return value.split()
    if isinstance(value, list | tuple):
        return list(value)
    raise DataError(f"{where}: column {column!r} must be a list (or a space-separated string); got {type(value).__name__}")


def _label_name(value: Any, names: list[str] | None, where: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: empty label")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: label must be a string or an integer; got {json.dumps(value)[:40]}")
    if names is not None and isinstance(value, int):  # datasets' ClassLabel stores indices
        if not 0 <= value < len(names):
            raise DataError(f"{where}: label index {value} outside the dataset's {len(names)} class names")
        return names[value]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _sorted_labels(found: set[str]) -> list[str]:
    if all(x.lstrip("-").isdigit() for x in found):
        return sorted(found, key=int)
    return sorted(found)


def _check_encoding(path: Path, encoding: str) -> None:
    """Raise a DataError naming the first line that does not decode."""
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid {encoding} text (byte 0x{data[e.start]:02x} at column {column}); "
            f"give the file's encoding (e.g. encoding='latin-1', --encoding latin-1)"
        ) from None
    except LookupError:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from None


def _read_delimited(path: Path, encoding: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    _check_encoding(path, encoding)
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (expected a header row)") from None
        header = [h.strip() for h in header]
        start = reader.line_num + 1
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                start = reader.line_num + 1
                continue  # blank lines are layout, not examples
            if len(cells) != len(header):
                raise DataError(f"{path}:{start}: {len(cells)} fields but the header has {len(header)}")
            yield f"{path}:{start}", dict(zip(header, cells, strict=True))
            start = reader.line_num + 1  # a quoted field may span lines: report where the row starts


def _read_jsonl(path: Path, encoding: str) -> Iterator[tuple[str, dict[str, Any]]]:
    _check_encoding(path, encoding)
    with open(path, encoding=encoding) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{n}", row


def _read_hf(source: str, split: str) -> tuple[Iterator[tuple[str, dict[str, Any]]], dict[str, list[str]], str]:
    """Rows of a ``datasets`` dataset, and the class names its features declare."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: not a file, and reading datasets needs `pip install datasets`") from None
    path = Path(source)
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
        elif not path.exists() and (path.is_absolute() or source.startswith(".") or path.suffix):
            raise DataError(f"{source}: no such file or folder")  # a path, not a hub id
        else:
            ds = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise DataError(f"{source}: cannot read as a datasets dataset: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    where = f"{source}[{split}]"
    names: dict[str, list[str]] = {}
    for col, feature in ds.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, list) and feature:  # datasets >= 3 may write List[...] as [feature]
            inner = feature[0]
        for f in (feature, inner):
            if isinstance(f, datasets.ClassLabel):
                names[col] = list(f.names)

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        for i, row in enumerate(ds):
            yield f"{where} row {i}", row

    return rows(), names, where


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def stratified_split(labels: Sequence[Any], fractions: Sequence[float], seed: int = 0) -> list[list[int]]:
    """Split indices into parts of the given fractions, class by class, reproducibly.

    Each class is shuffled with ``random.Random(seed)`` and cut by the fractions (largest remainders
    get the leftover examples), so every part keeps the class proportions. Returns one sorted index
    list per fraction; fractions must sum to 1 (or less: the rest is dropped).
    """
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to at most 1; got {list(fractions)}")
    rng = random.Random(seed)
    by_class: dict[Any, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    parts: list[list[int]] = [[] for _ in fractions]
    for key in sorted(by_class, key=str):
        members = by_class[key]
        rng.shuffle(members)
        exact = [f * len(members) for f in fractions]
        counts = [int(x) for x in exact]
        budget = min(len(members), round(sum(exact))) - sum(counts)
        for j in sorted(range(len(fractions)), key=lambda j: counts[j] - exact[j])[: max(0, budget)]:
            counts[j] += 1
        start = 0
        for j, c in enumerate(counts):
            parts[j].extend(members[start : start + c])
            start += c
    return [sorted(p) for p in parts]


def stratified_sample(labels: Sequence[Any], n: int, seed: int = 0) -> list[int]:
    """``n`` indices (or all, when fewer) keeping the class proportions; sorted."""
    if n >= len(labels):
        return list(range(len(labels)))
    return stratified_split(labels, [n / len(labels)], seed)[0]


# ---------------------------------------------------------------------------------------------
# Tokenising and batching
# ---------------------------------------------------------------------------------------------


class EncodedTask(torch.utils.data.Dataset):
    """A task split tokenised once; items are dicts of int lists (padded per batch by ``collate``)."""

    def __init__(self, data: TaskData, tokenizer: Any, max_length: int = 128):
        self.task_type, self.labels = data.task_type, list(data.labels)
        self.items = [encode_example(e, data.task_type, tokenizer, max_length) for e in data.examples]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]

    def collate(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_id)


def encode_example(example: Example, task_type: str, tokenizer: Any, max_length: int = 128) -> dict[str, Any]:
    """Tokenise one example; for token tasks, a word's tag goes on its first sub-word, -100 elsewhere;
    for causal_lm, prompt + response with labels on the response only (``causal_lm.encode_lm_example``);
    for seq2seq, the prompt in and the response as labels (``seq2seq.encode_seq2seq_example``)."""
    generation = TASKS[task_type].generation
    if generation == "causal":
        from .causal_lm import encode_lm_example

        return encode_lm_example(example, tokenizer, max_length)
    if generation == "seq2seq":
        from .seq2seq import encode_seq2seq_example

        return encode_seq2seq_example(example, tokenizer, max_length)
    if TASKS[task_type].labels == "word":
        enc = tokenizer(example.text, is_split_into_words=True, truncation=True, max_length=max_length)
        word_ids = enc.word_ids()
        labels, previous = [], None
        for w in word_ids:
            labels.append(-100 if w is None or w == previous else example.label[w])
            previous = w
        item = dict(enc)
        item["labels"] = labels
    else:
        enc = tokenizer(example.text, example.text_pair, truncation=True, max_length=max_length)
        item = dict(enc)
        item["labels"] = example.label
    return {k: list(v) if not isinstance(v, int) else v for k, v in item.items()}


def collate(features: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples to the longest: input_ids (B, T), attention_mask (B, T),
    token_type_ids (B, T) when present, labels (B,) or (B, T') with -100 on padding (T' is the longest
    label list: T, or a seq2seq decoder's own length)."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)
    if "labels" in features[0]:
        if isinstance(features[0]["labels"], list):
            label_width = max(len(f["labels"]) for f in features)
            batch["labels"] = torch.tensor(
                [f["labels"] + [-100] * (label_width - len(f["labels"])) for f in features], dtype=torch.long
            )
        else:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    return batch
