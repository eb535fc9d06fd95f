"""The model side of serving: tokenising requests, and running a batch of them in one forward pass.

Everything here but ``encode`` runs in the server's single model thread.
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import AdapterModel
from ..sites import SiteSpec
from ..tasks import tasks_for_lane
from .batcher import Job
from .cache import LoadedAdapter

# The task types each lane answers (``tasks.TASKS``: a record's ``lane`` and ``endpoint``).
SEQUENCE_TASKS = tasks_for_lane("classify")
TOKEN_TASKS = tasks_for_lane("tag")
LM_TASKS = tasks_for_lane("generate")


def split_by_length(lengths: Sequence[int], overhead: int, max_tokens: int) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into runs [i, j), one forward pass each, minimising padded tokens
    plus ``overhead`` per pass (a pass's fixed cost, in tokens), with no pass over ``max_tokens``
    padded tokens unless it holds a single row.

    A batch of mixed lengths padded to its longest row can waste half its compute on padding; on a
    CPU, where cost grows with tokens, two passes over similar lengths are then cheaper than one.
    Exact dynamic programme, O(n^2) for n rows.
    """
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            padded = (j - i) * lengths[j - 1]  # rows i..j-1 padded to the longest, the last
            if padded > max_tokens and j - i > 1:
                break
            cost = best[i] + overhead + padded
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


class InputTooLong(ValueError):
    """An input over the model's limit while the server rejects long inputs (HTTP 413)."""


def load_base(
    path: str | os.PathLike, kind: str = "auto", dtype: torch.dtype | None = None, sites: SiteSpec | str | None = None
) -> tuple[AdapterModel, Any]:
    """Load a base model and its tokenizer from ``path``; wrap the model in an AdapterModel.

    ``kind``: ``"encoder"`` (AutoModel), ``"causal-lm"`` (AutoModelForCausalLM, can generate),
    ``"seq2seq-lm"`` (AutoModelForSeq2SeqLM: T5, BART with their LM head, can generate) or ``"auto"``:
    seq2seq-lm when the config is an encoder-decoder, causal-lm when it names a ``...ForCausalLM`` /
    ``...LMHeadModel`` class, else encoder.
    ``sites``: as for ``AdapterModel`` (``"guess"`` or a ``SiteSpec``), for a base the site table lacks.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if kind == "auto":
        archs = getattr(config, "architectures", None) or []
        if getattr(config, "is_encoder_decoder", False):
            kind = "seq2seq-lm"  # a bare T5Model / BartModel cannot generate: load the LM head too
        elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            kind = "causal-lm"
        else:
            kind = "encoder"
    autos = {"encoder": AutoModel, "causal-lm": AutoModelForCausalLM, "seq2seq-lm": AutoModelForSeq2SeqLM}
    if kind not in autos:
        raise ValueError(f"model kind must be auto, {', '.join(autos)}; got {kind!r}")
    base = autos[kind].from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return AdapterModel(base.eval(), sites=sites).eval(), tokenizer


@dataclass
class Encoded:
    """One tokenised input."""

    ids: list[int]
    type_ids: list[int] | None
    truncated: bool = False
    offsets: list[tuple[int, int]] | None = None
    special: list[int] | None = None


@dataclass(eq=False)
class Row:
    """A job's payload: the pinned adapter (None: the base model alone) and the tokenised input."""

    adapter: LoadedAdapter | None
    encoded: Encoded
    options: dict[str, Any] = field(default_factory=dict)


class ModelRunner:
    """Tokenises requests and runs batches of them (classification, tagging, generation)."""

    def __init__(
        self,
        model: AdapterModel,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        on_long: str = "truncate",
        max_batch_tokens: int = 16384,
        split_overhead: int = 48,
    ):
        if on_long not in ("truncate", "reject"):
            raise ValueError(f"on_long must be 'truncate' or 'reject', got {on_long!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.on_long = on_long
        self.max_batch_tokens = max_batch_tokens
        self.split_overhead = split_overhead
        self.can_generate = bool(getattr(model.base, "can_generate", lambda: False)())
        # T5, BART: the prompt is the encoder's input, the answer the decoder's whole sequence
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        limit = model_max_length(model, tokenizer)
        self.max_length = min(max_length, limit) if max_length else limit
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )
        # Decoders pad on the left so every row's last token is its own (generation, last-token pooling);
        # an encoder (an encoder-decoder's too) on the right, so that absolute positions (BART's) start at 0.
        self.pad_left = self.can_generate and not self.encoder_decoder
        # A BERT tokenizer on a decoder (or any model without segment embeddings) still makes them.
        forward = getattr(model.base.base_model, "forward", None)
        self.uses_type_ids = forward is not None and "token_type_ids" in inspect.signature(forward).parameters

    # -- tokenising (event loop) ----------------------------------------------------------------

    def encode(
        self, text: str, pair: str | None = None, *, reserve: int = 0, offsets: bool = False
    ) -> Encoded:
        """Tokenise one input; over ``max_length - reserve`` tokens it is truncated or InputTooLong.

        ``reserve``: room for generated tokens. A decoder's continuation shares the prompt's positions;
        an encoder-decoder's decoder has its own, so there the prompt keeps all ``max_length`` and
        ``reserve`` (with the decoder's start token) must fit within ``max_length`` on its own.
        """
        if self.encoder_decoder and reserve:
            if reserve + 1 > self.max_length:
                raise InputTooLong(
                    f"no room for {reserve} new tokens: this model's decoder takes at most {self.max_length} tokens"
                )
            reserve = 0
        limit = self.max_length - reserve
        if limit < 1:
            raise InputTooLong(
                f"no room for the input: the model's limit is {self.max_length} tokens and {reserve} are reserved"
            )
        kwargs: dict[str, Any] = {"return_special_tokens_mask": offsets}
        if offsets and getattr(self.tokenizer, "is_fast", False):
            kwargs["return_offsets_mapping"] = True
        enc = self.tokenizer(text, pair, truncation=False, **kwargs)
        ids = list(enc["input_ids"])
        type_ids = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
        got_offsets = [tuple(o) for o in enc["offset_mapping"]] if "offset_mapping" in enc else None
        special = list(enc["special_tokens_mask"]) if "special_tokens_mask" in enc else None
        if len(ids) <= limit:
            return Encoded(ids, type_ids, False, got_offsets, special)
        if self.on_long == "reject":
            raise InputTooLong(
                f"input is {len(ids)} tokens long; this server's limit is {limit} (it rejects longer inputs)"
            )
        if self.can_generate and not self.encoder_decoder and pair is None:
            # a decoder's prompt: keep its end, which the continuation follows
            enc = self.tokenizer(text, truncation=False)
            return Encoded(list(enc["input_ids"])[-limit:], None, True)
        enc = self.tokenizer(text, pair, truncation=True, max_length=limit, **kwargs)
        return Encoded(
            list(enc["input_ids"]),
            list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
            True,
            [tuple(o) for o in enc["offset_mapping"]] if "offset_mapping" in enc else None,
            list(enc["special_tokens_mask"]) if "special_tokens_mask" in enc else None,
        )

    # -- batches (model thread) -----------------------------------------------------------------

    def run_batch(self, lane: Hashable, jobs: Sequence[Job]) -> list[Any]:
        """The batcher's callback: one result (or exception) per job."""
        kind = lane[0] if isinstance(lane, tuple) else lane
        with torch.inference_mode():
            if kind == "classify":
                return self._classify(jobs)
            if kind == "tag":
                return self._tag(jobs)
            if kind == "generate":
                return self._generate(jobs)
        raise ValueError(f"unknown lane {lane!r}")

    @staticmethod
    def _names(rows: list[Row]) -> list[str | None]:
        """Each row's adapter by its name in the model (None: the base model alone); pinned, so loaded."""
        return [None if r.adapter is None else r.adapter.name for r in rows]

    def _chunks(self, jobs: Sequence[Job]) -> list[list[Job]]:
        return [
            list(jobs[i:j])
            for i, j in split_by_length([j.length for j in jobs], self.split_overhead, self.max_batch_tokens)
        ]

    def _pad(self, encs: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        want_types = self.uses_type_ids and encs[0].type_ids is not None
        types = torch.zeros((len(encs), width), dtype=torch.long) if want_types else None
        for i, e in enumerate(encs):
            n = len(e.ids)
            cols = slice(width - n, width) if self.pad_left else slice(0, n)
            ids[i, cols] = torch.tensor(e.ids)
            mask[i, cols] = 1
            if types is not None and e.type_ids is not None:
                types[i, cols] = torch.tensor(e.type_ids)
        out = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            out["token_type_ids"] = types
        return out

    def _forward(self, jobs: list[Job]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows: list[Row] = [j.payload for j in jobs]
        inputs = self._pad([r.encoded for r in rows])
        device = self.model.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logits = self.model(**inputs, adapter_names=self._names(rows)).logits  # one mixed-task pass
        return logits.float().cpu(), inputs

    def _classify(self, jobs: Sequence[Job]) -> list[Any]:
        results: list[Any] = []
        for chunk in self._chunks(jobs):
            logits, _ = self._forward(chunk)  # (B, L)
            for job, row_logits in zip(chunk, logits, strict=True):
                row: Row = job.payload
                labels = row.adapter.labels
                probs = torch.softmax(row_logits[: len(labels)], dim=-1).tolist()
                best = max(range(len(labels)), key=probs.__getitem__)
                results.append(
                    {
                        "label": labels[best],
                        "scores": dict(zip(labels, probs, strict=True)),
                        "truncated": row.encoded.truncated,
                        "batch_size": len(chunk),
                    }
                )
        return results

    def _tag(self, jobs: Sequence[Job]) -> list[Any]:
        results: list[Any] = []
        for chunk in self._chunks(jobs):
            logits, inputs = self._forward(chunk)  # (B, T, L)
            width = inputs["input_ids"].shape[1]
            for job, row_logits in zip(chunk, logits, strict=True):
                row: Row = job.payload
                enc, labels = row.encoded, row.adapter.labels
                start = width - len(enc.ids) if self.pad_left else 0
                probs = torch.softmax(
                    row_logits[start : start + len(enc.ids), : len(labels)], dim=-1
                )  # (T, L)
                tokens = []
                for t, token_id in enumerate(enc.ids):
                    if enc.special is not None and enc.special[t]:
                        continue
                    p = probs[t].tolist()
                    best = max(range(len(labels)), key=p.__getitem__)
                    token = {
                        "token": self.tokenizer.convert_ids_to_tokens(token_id),
                        "label": labels[best],
                        "score": p[best],
                    }
                    if enc.offsets is not None:
                        token["start"], token["end"] = enc.offsets[t]
                    token["scores"] = dict(zip(labels, p, strict=True))
                    tokens.append(token)
                results.append({"tokens": tokens, "truncated": enc.truncated, "batch_size": len(chunk)})
        return results

    def _generate(self, jobs: Sequence[Job]) -> list[Any]:
        rows: list[Row] = [j.payload for j in jobs]
        options = rows[0].options  # one lane: every row shares max_new_tokens and greedy/sampling
        inputs = {k: v.to(self.model.device) for k, v in self._pad([r.encoded for r in rows]).items()}
        kwargs: dict[str, Any] = {
            "max_new_tokens": options["max_new_tokens"],
            "do_sample": options["do_sample"],
            "pad_token_id": self.pad_id,
        }
        seed = None
        if options["do_sample"]:
            seed = options.get("seed")
            seed = random.randrange(2**31) if seed is None else seed
            for key in ("temperature", "top_k", "top_p"):
                if options.get(key) is not None:
                    kwargs[key] = options[key]
        # fork_rng: a request's seed fixes its own sample without touching anyone else's RNG state.
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**inputs, adapter_names=self._names(rows), **kwargs)
        # A decoder returns prompt + continuation (B, width + n); an encoder-decoder its decoder's start
        # token + the answer (B, 1 + n): the whole decoded sequence, nothing of the prompt in it.
        start = 1 if self.encoder_decoder else inputs["input_ids"].shape[1]
        new = out[:, start:].cpu()
        results = []
        for row, tokens in zip(rows, new, strict=True):
            ids = tokens.tolist()
            if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(self.tokenizer.eos_token_id) + 1]
            results.append(
                {
                    "text": self.tokenizer.decode(ids, skip_special_tokens=True),
                    "token_ids": ids,
                    "seed": seed,
                    "truncated": row.encoded.truncated,
                    "batch_size": len(jobs),
                }
            )
        return results


def model_max_length(model: AdapterModel, tokenizer: Any) -> int:
    """The longest input the model takes: its position table, or the tokenizer's limit if smaller."""
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512
