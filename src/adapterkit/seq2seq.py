"""Seq2seq tasks: an adapter that teaches an encoder-decoder (T5, BART) to answer prompts.

An example is a prompt and its response, read as for ``causal_lm`` (``causal_lm.load_lm_task``: two
text columns of a CSV / JSON Lines file; no chats). The prompt is the encoder's input; the response
(and its end-of-sequence token, so that the model learns to stop) is the decoder's ``labels``, from
which the model makes its own decoder inputs (shifted right). The loss is therefore on the response
tokens only: the prompt has no labels at all.

Evaluation: when the responses are short answers (labels), by exact match of the generated answer
(greedy, from the encoder input: the whole decoded sequence is the answer, there is no prompt to cut
off); always by perplexity on the response tokens. ``causal_lm.generate_answers``, ``response_nll`` and
``exact_match`` work on an encoder-decoder too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .causal_lm import lm_scores
from .data import DataError, Example

TASK_TYPE = "seq2seq"


def encode_seq2seq_example(example: Example, tokenizer: Any, max_length: int = 256) -> dict[str, list[int]]:
    """input_ids = the prompt (with the tokenizer's special tokens); labels = the response + EOS.

    Each side is cut to ``max_length`` on its own (the encoder and the decoder have their own lengths);
    a response cut short keeps its EOS.
    """
    if not isinstance(example.text, str):
        raise DataError(f"{example.where}: a seq2seq prompt is one text, not a chat")
    enc = tokenizer(example.text, truncation=True, max_length=max_length)
    labels = list(tokenizer(text_target=example.text_pair or "", truncation=True, max_length=max_length)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not labels or labels[-1] != eos):  # a tokenizer that does not end targets itself
        labels = labels[: max_length - 1] + [eos]
    if not labels:
        raise DataError(f"{example.where}: empty response and no end-of-sequence token to learn")
    # only what an encoder-decoder's forward takes (a generic tokenizer adds token_type_ids)
    return {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"]), "labels": labels}


@torch.no_grad()
def evaluate_seq2seq(
    model: Any,
    name: str,
    data: Any,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dist: Any = None,
    max_answer_tokens: int = 8,
) -> dict[str, float]:
    """Scores of adapter ``name`` on an encoded seq2seq split (``data.EncodedTask``), as
    ``causal_lm.evaluate_lm`` gives them for a decoder:

    ``loss`` (mean cross-entropy of the response tokens), ``perplexity``, ``token_accuracy`` (greedy
    hits on the response, teacher-forced) and, when every response is a short answer (at most
    ``max_answer_tokens`` tokens), ``exact_match``: the sequence generated from the prompt equals the
    response token for token, including its end-of-sequence token. ``accuracy`` is exact match when
    there is one, else token accuracy. Under DDP (``dist``) each process takes every N-th example and
    the sums are reduced.
    """
    from .data import collate

    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    items = [data[i] for i in range(rank, len(data), world)]
    # the whole split decides whether exact match is scored: every process decides alike
    short = bool(data.items) and all(len(_answer(item)) <= max_answer_tokens for item in data.items)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # nll, tokens, token hits, exact hits, rows
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[start : start + batch_size], data.pad_id).items()}
        labels = batch["labels"]  # (B, L): the model shifts them right into its decoder inputs
        logits = model(**batch, adapter_names=[name] * labels.shape[0]).logits.float()  # (B, L, V), aligned
        keep = labels != -100
        sums[0] += F.cross_entropy(logits[keep], labels[keep], reduction="sum").double()
        sums[1] += keep.sum()
        sums[2] += (logits.argmax(-1)[keep] == labels[keep]).sum()
    if short:
        for start in range(0, len(items), batch_size):
            group = items[start : start + batch_size]
            sums[3] += _exact_hits(model, name, group, data.pad_id, device)
            sums[4] += len(group)
    if dist is not None and world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    return lm_scores(sums, short)


def _answer(item: dict[str, list[int]]) -> list[int]:
    """The response ids of an encoded example: its labels."""
    return [y for y in item["labels"] if y != -100]


def _exact_hits(model: Any, name: str, group: list[dict[str, list[int]]], pad: int, device: torch.device) -> int:
    """How many rows of ``group`` generate their response exactly (greedy, from the encoder input)."""
    width = max(len(item["input_ids"]) for item in group)
    ids = torch.full((len(group), width), pad, dtype=torch.long)  # (B, T) right-padded: the encoder's
    mask = torch.zeros_like(ids)  # positions (BART's are absolute) stay those of training
    for r, item in enumerate(group):
        ids[r, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
        mask[r, : len(item["input_ids"])] = 1
    answers = [_answer(item) for item in group]
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), adapter_names=[name] * len(group),
        max_new_tokens=max(len(a) for a in answers), do_sample=False, num_beams=1, pad_token_id=pad,
        eos_token_id=None,
    )
    # (B, 1 + n): the decoder's start token, then what it generated; nothing of the prompt is in it
    new = out[:, 1:].tolist()
    return sum(1 for a, g in zip(answers, new, strict=True) if g[: len(a)] == a)
