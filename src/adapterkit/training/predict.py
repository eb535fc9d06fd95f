"""Using trained artifacts on files: load one (``--full`` ones too), predict, score.

    model, names, tokenizer = load_trained(["runs/sentiment.safetensors"], base="path/to/model")
    load_trained(["runs/full.safetensors"], base="path/to/model")   # --full: reads runs/full.base.safetensors too

A ``--full`` run's artifact belongs to the fine-tuned base weights written beside it
(``OUT.base.safetensors``); ``load_trained`` puts those weights into the base model before loading
the artifact, so the fingerprint check compares like with like.

Several artifacts predict as one stream of mixed batches: every input row goes through every
artifact, and each forward pass holds rows for several adapters at once (``adapter_names`` per row).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..artifact import read_metadata
from ..atomic_io import atomic_write
from ..data import DataError, EncodedTask, Example, encode_example, load_task
from ..model import AdapterModel
from .config import DTYPES, run_paths
from .distributed import pick_device
from .evaluate import confusion_and_loss, metrics_from_confusion, per_class_report
from .loop import quiet_loading


def full_base_file(artifact: str | os.PathLike) -> Path | None:
    """The fine-tuned base weights of a ``--full`` artifact (``OUT.base.safetensors`` beside it), or
    ``None`` for an adapter artifact."""
    path = run_paths(artifact)["base"]
    return path if path.is_file() else None


def load_trained(
    artifacts: Sequence[str | os.PathLike],
    base: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quiet: bool = True,
) -> tuple[AdapterModel, list[str], Any]:
    """Load ``base`` (a Hugging Face folder) and the trained ``artifacts`` onto it; returns the model,
    the adapter names (one per artifact, in order) and the tokenizer.

    An artifact of a ``--full`` run brings its fine-tuned base weights (``OUT.base.safetensors``); it
    must be the only artifact, since it changes the base every other adapter would run on. Names
    clash-free: a second artifact saved under a name already taken gets its file's stem.
    """
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    if not artifacts:
        raise ValueError("no artifact to load")
    fulls = [a for a in artifacts if full_base_file(a) is not None]
    if fulls and len(artifacts) > 1:
        raise ValueError(f"{fulls[0]} is a --full artifact (its base weights are {full_base_file(fulls[0])}): "
                         "it changes the base model, so load it on its own")
    for a in artifacts:
        read_metadata(a)  # a bad file fails before the base model is loaded
    torch_dtype = DTYPES[dtype] if dtype else None
    with quiet_loading(quiet):
        tokenizer = AutoTokenizer.from_pretrained(base)
        base_model = AutoModel.from_pretrained(base, dtype=torch_dtype) if torch_dtype else AutoModel.from_pretrained(base)
    if fulls:
        weights = load_file(str(full_base_file(fulls[0])))
        missing, unexpected = base_model.load_state_dict(weights, strict=False)
        if unexpected or len(missing) > len(weights):
            raise ValueError(f"{full_base_file(fulls[0])}: these base weights do not fit {base} "
                             f"({len(unexpected)} unexpected keys, {len(missing)} missing)")
    model = AdapterModel(base_model)
    model.to(pick_device(device))
    names = []
    for a in artifacts:
        wanted = read_metadata(a)["name"]
        if wanted in model.list_adapters():
            wanted = Path(a).name.removesuffix(".safetensors")
        names.append(model.load_adapter(a, name=wanted))
    model.eval()
    return model, names, tokenizer


# ---------------------------------------------------------------------------------------------
# Reading inputs without labels
# ---------------------------------------------------------------------------------------------


def read_inputs(
    source: str | os.PathLike,
    task_type: str,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    tokens_column: str = "tokens",
    split: str = "train",
    encoding: str = "utf-8",
) -> list[Example]:
    """The inputs of a data file (labels, if any, are ignored): texts, text pairs or token lists, as
    ``Example`` with a dummy label. Every bad row is a DataError naming ``file:line``."""
    from ..data import _FILE_FORMATS, _as_list, _read_delimited, _read_hf, _read_jsonl, _text

    path = Path(source)
    if path.is_file():
        fmt = _FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .csv, .tsv or .jsonl, or a datasets folder")
        rows = _read_jsonl(path, encoding) if fmt == "jsonl" else _read_delimited(path, encoding, "\t" if fmt == "tsv" else ",")
    else:
        rows = _read_hf(str(source), split)[0]
    if task_type == "pair_classification" and text_pair_column is None:
        text_pair_column = "text_pair"
    wanted = {"token_classification": [tokens_column], "pair_classification": [text_column, text_pair_column]}.get(
        task_type, [text_column])
    examples = []
    for where, row in rows:
        for col in wanted:
            if col not in row:
                raise DataError(f"{where}: missing column {col!r} (columns: {', '.join(map(str, row)) or 'none'})")
        if task_type == "token_classification":
            tokens = [str(t) for t in _as_list(row[tokens_column], where, tokens_column)]
            if not tokens or any(not t.strip() for t in tokens):
                raise DataError(f"{where}: empty token list or empty token in column {tokens_column!r}")
            examples.append(Example(tokens, [0] * len(tokens), where=where))
        else:
            pair = _text(row[text_pair_column], where, text_pair_column) if task_type == "pair_classification" else None
            examples.append(Example(_text(row[text_column], where, text_column), 0, text_pair=pair, where=where))
    if not examples:
        raise DataError(f"{source}: no examples")
    return examples


# ---------------------------------------------------------------------------------------------
# Predicting
# ---------------------------------------------------------------------------------------------


def task_type_of(model: AdapterModel, names: Sequence[str]) -> str:
    """The one task type the adapters ``names`` share (predicting reads one kind of input)."""
    types = {n: model.adapter_info(n)["task"]["type"] for n in names}
    if len(set(types.values())) > 1:
        raise ValueError("these artifacts have different task types, so they read different inputs: "
                         + ", ".join(f"{n}: {t}" for n, t in types.items()))
    return next(iter(types.values()))


@torch.no_grad()
def predict(
    model: AdapterModel,
    names: Sequence[str],
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    task_type: str,
    batch_size: int = 64,
    max_length: int = 128,
) -> Iterator[dict[str, Any]]:
    """Every example through every adapter in ``names``: yields, in input order, one record per
    (example, adapter): ``row``, ``adapter``, and ``label`` + ``score`` (the top class's probability),
    or for token tasks ``tokens`` + ``tags`` (a word cut off by ``max_length`` gets tag ``None``).

    One forward pass holds ``batch_size`` (row, adapter) pairs, adapters mixed per row."""
    labels = {n: model.labels(n) for n in names}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    from ..data import collate

    pairs = [(i, n) for i in range(len(examples)) for n in names]  # row-major: row 0 through every adapter...
    encoded: dict[int, dict[str, Any]] = {}
    device = model.device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        for i, _ in chunk:
            if i not in encoded:
                encoded[i] = encode_example(examples[i], task_type, tokenizer, max_length)
        batch = collate([encoded[i] for i, _ in chunk], pad)
        batch.pop("labels", None)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch, adapter_names=[n for _, n in chunk]).logits.float()  # (B, L) or (B, T, L)
        probs = logits.softmax(-1)  # -inf padding of shorter label sets gets probability 0
        score, top = probs.max(-1)
        for b, (i, name) in enumerate(chunk):
            if task_type == "token_classification":
                yield {"row": i, "adapter": name, "tokens": list(examples[i].text),
                       "tags": _word_tags(encoded[i]["labels"], top[b].tolist(), len(examples[i].text), labels[name])}
            else:
                yield {"row": i, "adapter": name, "label": labels[name][int(top[b])], "score": float(score[b])}
        # pairs are row-major, so only the chunk's last row can continue into the next chunk
        encoded = {chunk[-1][0]: encoded[chunk[-1][0]]}


def _word_tags(first_subword_mask: list[int], predicted: list[int], n_words: int, names: list[str]) -> list[str | None]:
    """One tag per word, read at the word's first sub-word (where ``encode_example`` put its label)."""
    tags: list[str | None] = []
    for position, mark in enumerate(first_subword_mask):
        if mark != -100:
            tags.append(names[predicted[position]])
    return tags + [None] * (n_words - len(tags))


def write_predictions(path: str | os.PathLike, records: Iterator[dict[str, Any]]) -> int:
    """Write prediction records to ``path`` (``.csv`` or ``.jsonl``), atomically, streaming; returns
    how many were written. Token tasks' tags are space-joined in CSV."""
    path = Path(path)
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: predictions are written as .csv or .jsonl; got {path.suffix!r}")
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = None
            for record in records:
                if fmt == "jsonl":
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                else:
                    row = {k: " ".join("" if t is None else t for t in v) if isinstance(v, list) else v
                           for k, v in record.items()}
                    if writer is None:
                        writer = csv.DictWriter(f, fieldnames=list(row))
                        writer.writeheader()
                    writer.writerow(row)
                count += 1

    atomic_write(path, write)
    return count


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def score_file(
    model: AdapterModel,
    name: str,
    tokenizer: Any,
    data: str | os.PathLike,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    data_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and a per-class report of adapter ``name`` on a labelled file (its
    labels must be among the artifact's)."""
    options = dict(data_options or {})
    info = model.adapter_info(name)
    task = load_task(data, task_type=info["task"]["type"], labels=model.labels(name), **options)
    confusion, loss = confusion_and_loss(model, name, EncodedTask(task, tokenizer, max_length), batch_size=batch_size)
    return {
        "adapter": name,
        "data": str(data),
        "examples": len(task),
        **metrics_from_confusion(confusion),
        "loss": loss,
        "per_class": per_class_report(confusion, model.labels(name)),
    }


def format_report(scores: dict[str, Any]) -> str:
    """A plain-text table of ``score_file``'s result."""
    out = io.StringIO()
    width = max(5, *(len(r["label"]) for r in scores["per_class"]))
    out.write(f"{'label':{width}s} precision  recall      f1  support\n")
    for r in scores["per_class"]:
        out.write(f"{r['label']:{width}s} {r['precision']:9.4f} {r['recall']:7.4f} {r['f1']:7.4f} {r['support']:8d}\n")
    out.write(f"\n{scores['adapter']} on {scores['data']} ({scores['examples']} examples): "
              f"accuracy={scores['accuracy']:.4f} macro_f1={scores['macro_f1']:.4f} loss={scores['loss']:.4f}\n")
    return out.getvalue()
