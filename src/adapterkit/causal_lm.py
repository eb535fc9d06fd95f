"""Causal-LM tasks: an adapter that teaches a decoder to answer prompts.

An example is a prompt and its response — two text columns (``prompt``, ``response``) of a CSV / JSON
Lines file, or a chat (``messages``: a list of ``{"role", "content"}``, the last one the assistant's
answer) rendered with the tokenizer's chat template. The loss covers the response tokens only (and
the end-of-sequence token after them, so that the model learns to stop): prompt tokens get label
-100.

Evaluation: when the responses are short answers (labels), by exact match of the generated answer
(greedy); always by perplexity on the response tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import DataError, Example, TaskData, _read_delimited, _read_jsonl, _text

TASK_TYPE = "causal_lm"
ROLES = ("system", "user", "assistant")


# -- reading ---------------------------------------------------------------------------------------


def load_lm_task(
    source: str | Path,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
    encoding: str = "utf-8",
    task_type: str = TASK_TYPE,
    chats: bool = True,
) -> TaskData:
    """Read prompt/response examples (or chats) from a ``.csv`` / ``.tsv`` / ``.jsonl`` file.

    A row with ``messages_column`` is a chat: a JSON list (or, in a CSV cell, a JSON string) of
    ``{"role": "system"|"user"|"assistant", "content": str}`` ending with the assistant's answer. Every
    other row needs ``prompt_column`` and ``response_column``. Returns ``TaskData(task_type, [], ...)``
    whose examples hold the prompt (a string, or the chat's messages before the answer) in ``text`` and
    the response in ``text_pair``. ``chats=False`` (``seq2seq``) refuses chat rows.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such file ({task_type} data is a .csv, .tsv or .jsonl file)")
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows = _read_jsonl(path, encoding)
    elif suffix in (".csv", ".tsv"):
        rows = _read_delimited(path, encoding, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .csv, .tsv or .jsonl")
    examples = []
    for where, row in rows:
        if messages_column in row and row[messages_column] not in (None, ""):
            if not chats:
                raise DataError(f"{where}: a {task_type} example is a {prompt_column!r} and a {response_column!r}, "
                                f"not a chat ({messages_column!r}: causal_lm only)")
            prompt, response = _split_chat(row[messages_column], where, messages_column)
        else:
            for col in (prompt_column, response_column):
                if col not in row:
                    have = ", ".join(str(c) for c in row) or "none"
                    raise DataError(f"{where}: missing column {col!r} (columns: {have}; or give {messages_column!r})")
            prompt = _text(row[prompt_column], where, prompt_column)
            response = _text(row[response_column], where, response_column)
        examples.append(Example(prompt, 0, response, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return TaskData(task_type, [], examples, str(path))


def _split_chat(value: Any, where: str, column: str) -> tuple[list[dict[str, str]], str]:
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: column {column!r} is not a JSON list of messages: {e}") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column {column!r} must be a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': a string}}; got {m!r}")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer (got role {messages[-1]['role']!r})")
    if len(messages) < 2:
        raise DataError(f"{where}: a chat needs at least one message before the assistant's answer")
    return messages[:-1], messages[-1]["content"]


# -- tokenising ------------------------------------------------------------------------------------


def prompt_text(prompt: str | list[dict[str, str]], tokenizer: Any) -> tuple[str, bool]:
    """The prompt as the model sees it, and whether it is a rendered chat (which carries its own
    special tokens: tokenise it with ``add_special_tokens=False``)."""
    if isinstance(prompt, str):
        return prompt, False
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat examples need a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), True


def encode_lm_example(example: Example, tokenizer: Any, max_length: int = 256) -> dict[str, list[int]]:
    """input_ids = prompt + response + EOS; labels = -100 on the prompt, the ids on the rest.

    Over ``max_length`` the prompt loses its beginning first (the answer depends on its end), then the
    response its end; at least one response token is kept.
    """
    text, chat = prompt_text(example.text, tokenizer)
    prompt = list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    response = list(tokenizer(example.text_pair or "", add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    if not response:
        raise DataError(f"{example.where}: empty response and no end-of-sequence token to learn")
    room = max_length - len(response)
    if room < 1:  # the response alone fills the window: keep one prompt token and the response's start
        prompt, response = prompt[-1:], response[: max_length - 1]
    elif len(prompt) > room:
        prompt = prompt[-room:]
    ids = prompt + response
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + response}


# -- evaluating ------------------------------------------------------------------------------------


def normalise_answer(text: str) -> str:
    """An answer for exact match: its first line, trimmed, case-folded, without surrounding
    punctuation or quotes."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"^[\W_]+|[\W_]+$", "", line.strip()).casefold()


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    adapter: str | None,
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to ``prompts`` with ``adapter`` (None: the base alone), batched.

    A decoder's prompts are left-padded and its answer is what follows the prompt; an encoder-decoder's
    (``seq2seq``) are right-padded into the encoder and its answer is the whole generated sequence.
    """
    device = next(model.parameters()).device
    encoder_decoder = _is_encoder_decoder(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = []
    for p in prompts:
        text, chat = prompt_text(p, tokenizer)
        encoded.append(list(tokenizer(text, add_special_tokens=not chat)["input_ids"]))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad little
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):
                at = slice(0, len(encoded[i])) if encoder_decoder else slice(width - len(encoded[i]), width)
                ids[r, at] = torch.tensor(encoded[i])
                mask[r, at] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), adapter_names=[adapter] * len(rows),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            )
            # a decoder returns prompt + continuation (B, width + n); an encoder-decoder its decoder's
            # start token + the answer (B, 1 + n)
            start = 1 if encoder_decoder else width
            for r, i in enumerate(rows):
                answers[i] = tokenizer.decode(out[r, start:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions whose normalised answer equals the reference's."""
    if not references:
        return float("nan")
    hits = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


@torch.no_grad()
def response_nll(model: Any, batch: dict[str, torch.Tensor], adapter: str | None) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled (response) tokens of one batch, and their count.

    On an encoder-decoder the labels are the decoder's (the model shifts them into its inputs)."""
    labels = batch["labels"]
    names = [adapter] * labels.shape[0]  # per row: all None means the base alone, not the active adapter
    if _is_encoder_decoder(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    adapter_names=names)
        logits = out.logits.float()  # (B, L, V): position t predicts label t
        target = labels.to(logits.device)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=names)
        logits = out.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        target = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
    return float(nll), int((target != -100).sum())


def _is_encoder_decoder(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens) if tokens else float("nan")


def looks_labelled(data: TaskData, max_words: int = 4, min_share: float = 0.9) -> bool:
    """Whether the responses are short answers (labels), so that exact match means something."""
    responses = [e.text_pair or "" for e in data.examples]
    short = sum(1 for r in responses if 0 < len(r.split()) <= max_words)
    return bool(responses) and short / len(responses) >= min_share


# -- evaluation inside training (``adapterkit train``) ---------------------------------------------


@torch.no_grad()
def evaluate_lm(
    model: Any,
    name: str,
    data: Any,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dist: Any = None,
    max_answer_tokens: int = 8,
) -> dict[str, float]:
    """Scores of adapter ``name`` on an encoded causal_lm split (``data.EncodedTask``):

    ``loss`` (mean cross-entropy of the response tokens), ``perplexity``, ``token_accuracy`` (greedy
    next-token hits on the response, teacher-forced) and, when every response is a short answer (at
    most ``max_answer_tokens`` tokens), ``exact_match``: the greedy continuation of the prompt equals
    the response token for token, including its end-of-sequence token. ``accuracy`` is exact match
    when there is one, else token accuracy. Under DDP (``dist``) each process takes every N-th example
    and the sums are reduced.
    """
    from .data import collate

    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    items = [data[i] for i in range(rank, len(data), world)]
    answers = [_answer(item) for item in data.items]  # the whole split: every process decides alike
    short = bool(answers) and all(len(a[1]) <= max_answer_tokens for a in answers)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # nll, tokens, token hits, exact hits, rows
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[start : start + batch_size], data.pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch, adapter_names=[name] * labels.shape[0]).logits[:, :-1].float()  # (B, T-1, V)
        target = labels[:, 1:]
        keep = target != -100
        sums[0] += F.cross_entropy(logits[keep], target[keep], reduction="sum").double()
        sums[1] += keep.sum()
        sums[2] += (logits.argmax(-1)[keep] == target[keep]).sum()
    if short:
        mine = [answers[i] for i in range(rank, len(data), world)]
        for start in range(0, len(mine), batch_size):
            group = mine[start : start + batch_size]
            hits = _exact_hits(model, name, group, data.pad_id, device)
            sums[3] += hits
            sums[4] += len(group)
    if dist is not None and world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    return lm_scores(sums, short)


def lm_scores(sums: torch.Tensor, short: bool) -> dict[str, float]:
    """Scores from summed (response NLL, response tokens, token hits, exact hits, rows): loss,
    perplexity, token accuracy and, for tasks with short answers, exact match (then ``accuracy``)."""
    nll, tokens, token_hits, hits, rows = sums.tolist()
    out = {
        "loss": nll / max(tokens, 1),
        "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "token_accuracy": token_hits / max(tokens, 1),
    }
    if short:
        out["exact_match"] = hits / max(rows, 1)
    out["accuracy"] = out.get("exact_match", out["token_accuracy"])
    return out


def _answer(item: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of an encoded example: the response is where labels start."""
    labels = item["labels"]
    start = next((i for i, y in enumerate(labels) if y != -100), len(labels))
    return item["input_ids"][:start], item["input_ids"][start:]


def _exact_hits(model: Any, name: str, group: list[tuple[list[int], list[int]]], pad: int, device: torch.device) -> int:
    width = max(len(p) for p, _ in group)
    ids = torch.full((len(group), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, _) in enumerate(group):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    longest = max(len(a) for _, a in group)
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), adapter_names=[name] * len(group),
        max_new_tokens=longest, do_sample=False, pad_token_id=pad, eos_token_id=None,
    )
    new = out[:, width:].tolist()
    return sum(1 for (_, a), g in zip(group, new, strict=True) if g[: len(a)] == a)
