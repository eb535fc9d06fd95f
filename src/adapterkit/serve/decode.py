"""Continuous batching for generation: requests join the running decode batch between two steps and
leave when they end, each row with its own adapter, KV cache rows and sampling options.

``DecodeEngine`` is the model side, run in the server's one model thread: ``step(newcomers,
cancelled)`` prefills the newcomers, merges their KV caches into the running batch, runs one decode
step for every row and returns the tokens as ``TokenEvent``s. ``DecodeLoop`` is the asyncio side: it
queues requests, calls ``step`` in the model thread for as long as any row is running, and hands each
request its events as an async stream.

The KV cache is a transformers ``DynamicCache`` of the whole batch, ``(S, H, L, D)`` per layer, with a
2-D attention mask ``(S, L)`` marking each row's real entries. Each of the S cache rows is a *slot*:
a running request's, or free (its request finished). Rows are left-padded: every row's newest token
sits in the last column, so one decode step appends one column for all slots. A row's position ids
are its own token count (passed explicitly), so its padding never shifts its rotary positions.

A finished row only frees its slot (its mask row zeroed, routed to no adapter): no copy of the cache.
A newcomer takes a free slot in place (its prefill cache, left-padded to L, written over the slot's
row), else the batch grows by concatenation; a prompt wider than L pads the cache on the left first.
Free slots still ride along in each decode step (a pad token each), so once they are a quarter of
the batch with none taken, the cache is compacted (one ``index_select``). Leading columns that are
padding for every slot are dropped by slicing (a view; the next step's concatenation copies anyway).
In steady state (rows finishing and joining every few steps) the cache is thus copied only by
``DynamicCache``'s own growth, not once more per change.

A greedy row's tokens equal the same request generated alone: padded entries get zero attention
weight, and each row's own rotary positions, adapter and sampler are its own. A prefix-tuning row's
prefix enters the cache at its prefill (``kinds/prefix.py``'s hook fills the empty cache); from then on
its P columns are ordinary cache entries under the engine's mask (``mark_packed``), re-packed like the
rest, with positions that count the prompt's tokens only.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import random
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..kinds.prefix import mark_packed, prefix_state
from ..model import AdapterModel
from ..routing import routed
from .batcher import QueueFull
from .runner import split_by_length

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class SamplingOptions:
    """One request's decoding options.

    ``temperature`` 0 is greedy (argmax; ``top_k`` / ``top_p`` / ``seed`` then change nothing); above 0
    the logits are divided by it, cut to the ``top_k`` most likely tokens, then to the smallest set
    whose probability reaches ``top_p``, and sampled with a generator seeded by ``seed`` (a random seed
    when None). Generation ends at an end-of-sequence token (unless ``ignore_eos``), at the first
    occurrence of any ``stop`` string (the text ends before it), or after ``max_tokens`` tokens.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1; got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0; got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None; got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None; got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings; got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_ids = itertools.count(1)


@dataclass(eq=False)
class DecodeRequest:
    """A prompt (token ids), the adapter that serves it (its name in the model; None: the base model
    alone) and its options. ``id`` is unique within the process."""

    prompt_ids: list[int]
    adapter: str | None = None
    options: SamplingOptions = field(default_factory=SamplingOptions)
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class TokenEvent:
    """What one step produced for one request: a token (None on a finish without one: a cancelled
    or failed request), the text it adds (held back while it might begin a stop string or ends inside
    a UTF-8 character), and, on its last event, why it finished."""

    request: DecodeRequest
    token_id: int | None
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: BaseException | None = None


class _Row:
    """A running request's state."""

    def __init__(self, request: DecodeRequest, device: torch.device):
        self.request = request
        self.options = request.options
        self.tokens: list[int] = []  # generated so far (an end-of-sequence token is not kept)
        self.length = len(request.prompt_ids)  # real tokens in the KV cache + the pending one
        self.emitted = 0  # characters of the text already sent
        self.generator: torch.Generator | None = None
        if not self.options.greedy:
            seed = self.options.seed if self.options.seed is not None else random.randrange(2**63)
            self.generator = torch.Generator(device=device).manual_seed(seed)


def unsupported_reason(model: AdapterModel) -> str | None:
    """Why continuous decoding cannot serve ``model``'s base, or None when it can.

    An encoder-decoder (T5, BART) would need per-row encoder outputs and cross-attention caches beside
    the self-attention cache, with the decoder's absolute positions (BART's) kept per row: not built.
    """
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return (
            f"continuous decoding serves decoder-only base models; this one ({config.model_type}) is an "
            "encoder-decoder: use /v1/generate"
        )
    return None


class DecodeEngine:
    """The decode batch of one model: rows join and leave between steps. Not thread-safe: call it
    from one thread (the server's model thread).

    Args:
        model: an AdapterModel on a decoder (``...ForCausalLM``); adapters are named per row.
        tokenizer: its tokenizer (text of the generated tokens, stop strings).
        max_batch_size: most rows decoding together.
        max_prefill_tokens: most padded prompt tokens prefilled in one forward pass; more newcomers
            are prefilled in several passes (split by length: little padding).
        eos_token_ids: tokens that end a row; default: the model's generation config and the tokenizer.
        max_length: the longest row (prompt + generated), default the model's position limit.
    """

    def __init__(
        self,
        model: AdapterModel,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 4096,
        eos_token_ids: Collection[int] | None = None,
        max_length: int | None = None,
        pad_token_id: int | None = None,
    ):
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be >= 1")
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        self.base = model.base
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.eos = set(eos_token_ids) if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 1 << 30
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.keep_arg = _logits_to_keep_arg(self.base)
        # transformers 5.x names the cache argument ``cache`` (``past_key_values`` is deprecated there)
        params = inspect.signature(self.base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.slots: list[_Row | None] = []  # cache row i serves slots[i]; None: a free slot
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (S, L) 1 where the cache holds a real token
        self.route: Any = None  # the slots' route; None: to be rebuilt before the next forward
        self._freed = False  # slots were freed this step: ``_tidy`` looks at the cache
        self.steps = 0  # decode steps run, for statistics and tests

    @property
    def rows(self) -> list[_Row]:
        """The running rows, in slot order."""
        return [r for r in self.slots if r is not None]

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def room(self) -> int:
        return self.max_batch_size - self.active

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- one step ---------------------------------------------------------------------------------

    def step(
        self, newcomers: Sequence[DecodeRequest] = (), cancelled: Collection[int] = ()
    ) -> list[TokenEvent]:
        """Drop the ``cancelled`` request ids, prefill ``newcomers`` (at most ``room``) and merge
        them in, then run one decode step for every row. Returns the events, in row order.

        A failed forward pass fails the rows it ran (their last event carries the error); the engine
        stays usable.
        """
        if len(newcomers) > self.room:
            raise ValueError(f"{len(newcomers)} newcomers but room for {self.room} rows")
        events: list[TokenEvent] = []
        with torch.inference_mode():
            if cancelled:
                gone = {id(r) for r in self.slots if r is not None and r.request.id in cancelled}
                for r in self.rows:
                    if id(r) in gone:
                        events.append(TokenEvent(r.request, None, "", "cancelled", len(r.tokens)))
                self._free(gone)
            self._admit(newcomers, events)
            # Newcomers decode too: the prefill chose their first token, this step their second.
            if self.active:
                self._decode(events)
            self._tidy()
        return events

    # -- prefill -------------------------------------------------------------------------------

    def _admit(self, newcomers: Sequence[DecodeRequest], events: list[TokenEvent]) -> None:
        if not newcomers:
            return
        ordered = sorted(newcomers, key=lambda r: len(r.prompt_ids))
        lengths = [len(r.prompt_ids) for r in ordered]
        for i, j in split_by_length(lengths, overhead=64, max_tokens=self.max_prefill_tokens):
            group = [_Row(req, self.device) for req in ordered[i:j]]
            try:
                cache, mask, logits = self._prefill(group)
            except Exception as e:  # noqa: BLE001 - fails this group only; the batch keeps running
                events.extend(TokenEvent(r.request, None, "", "error", 0, e) for r in group)
                continue
            self._merge(group, cache, mask)
            self._free(self._emit(group, logits, events))

    def _prefill(self, rows: list[_Row]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One forward pass over left-padded prompts: their KV cache, mask (n, W) and last logits (n, V)."""
        width = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.request.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.request.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from 0 at its first token
        cache = DynamicCache()
        route = self.model._make_route([r.request.adapter for r in rows])
        with routed(self.model, route):
            out = self.base(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self.cache_arg: cache},
                **self.keep_arg,
            )
        state = prefix_state(cache)
        if state is not None:
            # prefix tuning's hook put each row's prefix (P_max columns) before the prompt: from here on
            # they are ordinary cache entries, masked by the engine's own mask (n, P_max + W)
            mask = torch.cat([state[1].to(mask.dtype), mask], dim=1)
        return cache, mask, out.logits[:, -1, :].float()  # the cache was filled in place

    # -- the decode batch ----------------------------------------------------------------------

    def _decode(self, events: list[TokenEvent]) -> None:
        slots = self.slots
        # a free slot decodes a pad token at position 0, attending to itself only (finite, ignored)
        ids = torch.tensor([[self.pad_id if r is None else r.tokens[-1]] for r in slots], dtype=torch.long,
                           device=self.device)  # (S, 1)
        positions = torch.tensor([[0 if r is None else r.length - 1] for r in slots], dtype=torch.long,
                                 device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(slots), 1))], dim=1)  # (S, L + 1)
        rows = self.rows
        if self.route is None:  # slots changed: free ones route to no adapter
            self.route = self.model._make_route([None if r is None else r.request.adapter for r in slots])
        try:
            with routed(self.model, self.route):
                out = self.base(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self.cache_arg: self.cache},
                )
        except Exception as e:  # noqa: BLE001 - the batch's state is unknown now: fail its rows
            events.extend(TokenEvent(r.request, None, "", "error", len(r.tokens), e) for r in rows)
            self._reset()
            return
        self.steps += 1
        self.mask = mask  # the cache grew by one column in place
        logits = out.logits[:, -1, :]  # (S, V)
        if len(rows) < len(slots):
            live = [i for i, r in enumerate(slots) if r is not None]
            logits = logits.index_select(0, torch.tensor(live, device=logits.device))
        self._free(self._emit(rows, logits.float(), events))  # logits (B, V) of the running rows

    def _emit(self, rows: list[_Row], logits: torch.Tensor, events: list[TokenEvent]) -> set[int]:
        """Choose each row's next token from its logits (n, V), record it, and return the ids of the
        rows that finished."""
        chosen = _choose(logits, rows)
        done: set[int] = set()
        for r, token in zip(rows, chosen, strict=True):
            finish = None
            if token in self.eos and not r.options.ignore_eos:
                finish = "stop"  # the end-of-sequence token is not part of the answer
            else:
                r.tokens.append(token)
                r.length += 1
                if len(r.tokens) >= r.options.max_tokens or r.length >= self.max_length:
                    finish = "length"
            text, stopped = self._text(r, final=finish is not None)
            if stopped:
                finish = "stop"
            events.append(TokenEvent(r.request, token, text, finish, len(r.tokens)))
            if finish is not None:
                done.add(id(r))
        return done

    def _text(self, r: _Row, *, final: bool) -> tuple[str, bool]:
        """The new text since the last event, and whether a stop string ended the row. Unless
        ``final``, text that may be the start of a stop string or of a multi-byte character waits."""
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        stops = r.options.stop
        if stops:
            # Only text from (emitted - longest stop) on can hold a new match: earlier text was checked.
            start = max(0, r.emitted - max(map(len, stops)))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                end = min(hits)
                new = text[r.emitted : max(end, r.emitted)]
                r.emitted = max(end, r.emitted)
                return new, True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # a character whose remaining bytes come with the next token
                end = len(text.rstrip("\ufffd"))
            end -= _stop_prefix(text[:end], stops)
        new = text[r.emitted : max(end, r.emitted)]
        r.emitted = max(end, r.emitted)
        return new, False

    # -- cache surgery -------------------------------------------------------------------------

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Put ``rows`` (their prefill cache and mask (n, W)) into the batch: free slots first, in place."""
        pairs = _kv_pairs(cache)
        # Padded entries hold whatever the model computed for pad tokens: zero them, so that no value
        # there (even a non-finite one) can reach a real row through a zero attention weight.
        pad = (mask == 0)[:, None, :, None]  # (n, 1, W, 1)
        pairs = [(k.masked_fill(pad, 0), v.masked_fill(pad, 0)) for k, v in pairs]
        if self.cache is None:
            self.slots, self.mask = list(rows), mask
            self.cache = _set_pairs(cache, pairs)
        else:
            old = _kv_pairs(self.cache)
            if mask.shape[1] > self.mask.shape[1]:  # a prompt wider than the cache: pad it on the left
                width = mask.shape[1]
                old = [(_left_pad(k, width, 2), _left_pad(v, width, 2)) for k, v in old]
                self.mask = _left_pad(self.mask, width, 1)
            width = self.mask.shape[1]
            pairs = [(_left_pad(k, width, 2), _left_pad(v, width, 2)) for k, v in pairs]  # (n, H, L, D)
            mask = _left_pad(mask, width, 1)
            free = [i for i, r in enumerate(self.slots) if r is None][: len(rows)]
            m = len(free)
            if m:  # overwrite whole free rows: every column of theirs is the newcomer's (zeros before it)
                index = torch.tensor(free, device=self.mask.device)
                for (k0, v0), (k1, v1) in zip(old, pairs, strict=True):
                    k0.index_copy_(0, index, k1[:m])
                    v0.index_copy_(0, index, v1[:m])
                self.mask.index_copy_(0, index, mask[:m])
                for i, r in zip(free, rows, strict=False):
                    self.slots[i] = r
            if m < len(rows):
                old = [(torch.cat([k0, k1[m:]]), torch.cat([v0, v1[m:]])) for (k0, v0), (k1, v1) in zip(old, pairs, strict=True)]
                self.mask = torch.cat([self.mask, mask[m:]])
                self.slots.extend(rows[m:])
            self.cache = _set_pairs(self.cache, old)
        self.route = None

    def _free(self, done: Collection[int]) -> None:
        """Free the slots of the rows whose ``id`` is in ``done``; their entries are masked from now on."""
        if not done:
            return
        for i, r in enumerate(self.slots):
            if r is not None and id(r) in done:
                self.slots[i] = None
                self.mask[i] = 0
        self._freed = True
        self.route = None

    def _tidy(self) -> None:
        """After a step that freed slots: reset when none runs; compact when a quarter of the slots are
        free; drop leading columns that are padding for every slot."""
        if not self._freed:
            return
        self._freed = False
        live = [i for i, r in enumerate(self.slots) if r is not None]
        if not live:
            self._reset()
            return
        pairs = _kv_pairs(self.cache)
        if 4 * (len(self.slots) - len(live)) >= len(self.slots):
            index = torch.tensor(live, device=self.mask.device)
            self.mask = self.mask.index_select(0, index)
            pairs = [(k.index_select(0, index), v.index_select(0, index)) for k, v in pairs]
            self.slots = [self.slots[i] for i in live]
            self.route = None
        first = int(self.mask.any(0).nonzero()[0])  # the first column any slot uses
        if first:
            self.mask = self.mask[:, first:]
            pairs = [(k[:, :, first:], v[:, :, first:]) for k, v in pairs]
        self.cache = _set_pairs(self.cache, pairs)

    def _reset(self) -> None:
        self.slots, self.cache, self.mask, self.route, self._freed = [], None, None, None, False


# -- sampling --------------------------------------------------------------------------------------


def _choose(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """Each row's next token from its logits (n, V): argmax for greedy rows, else its own sampler."""
    chosen = logits.argmax(-1).tolist()
    for i, r in enumerate(rows):
        if not r.options.greedy:
            chosen[i] = sample(logits[i], r.options, r.generator)
    return chosen


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> int:
    """One token from logits (V,): temperature, then top-k, then top-p (nucleus), then a draw."""
    x = logits.float() / options.temperature
    if options.top_k is not None and options.top_k < x.shape[-1]:
        kth = torch.topk(x, options.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if options.top_p is not None and options.top_p < 1:
        probs, order = torch.sort(F.softmax(x, dim=-1), descending=True)
        # drop a token when the tokens more likely than it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= options.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(F.softmax(x, dim=-1), 1, generator=generator))


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# -- transformers cache helpers (4.57 and 5.x) ----------------------------------------------------


def _kv_pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (B, H, L, D)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers < 4.56


def _set_pairs(cache: Any, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """``cache`` holding these (keys, values) per layer: its layers' tensors replaced (no copy) where
    the cache has layer objects (transformers >= 4.56), else a new cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None and len(layers) == len(pairs) and all(getattr(la, "keys", None) is not None for la in layers):
        for layer, (k, v) in zip(layers, pairs, strict=True):
            layer.keys, layer.values = k, v
        mark_packed(cache)
        return cache
    return _make_cache(pairs)


def _make_cache(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    mark_packed(cache)  # prefix adapters' entries are in it already, under the engine's mask
    return cache


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left along ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _logits_to_keep_arg(base: Any) -> dict[str, int]:
    """Ask the model for the last position's logits only (a prompt's others are never used)."""
    params = inspect.signature(base.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _eos_ids(model: AdapterModel, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config = getattr(model.base, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if config is None or eos is not None:  # a model that says "no EOS" (None) is taken at its word
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(tokenizer.eos_token_id)
    return ids


# -- the asyncio side ------------------------------------------------------------------------------


class GenerationStream:
    """One request's events, as an async iterator that ends after the finishing event."""

    def __init__(self, request: DecodeRequest, loop: DecodeLoop):
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.finished = False

    def _put(self, event: TokenEvent) -> None:
        self._queue.put_nowait(event)

    def cancel(self) -> None:
        """Stop generating (the client went away); the row leaves the batch at the next step."""
        if not self.finished:
            self._loop._cancel(self.request.id)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenEvent]:
        while not self.finished:
            event = await self._queue.get()
            if event.finish_reason is not None:
                self.finished = True
            yield event


class DecodeLoop:
    """Feeds a DecodeEngine from an asyncio queue; each step runs in ``executor`` (the model thread).

    Between two steps, queued requests join (up to the engine's room) — ``policy="continuous"``; with
    ``policy="static"`` they join only when the batch is empty (static batching, for comparison).
    ``release`` callbacks given to ``submit`` run on the event loop once a request has left the batch
    (finished, cancelled or failed): the server unpins its adapter there, never while a row uses it.
    """

    def __init__(self, engine: DecodeEngine, executor: Executor, *, max_queue: int = 512, policy: str = "continuous"):
        if policy not in ("continuous", "static"):
            raise ValueError(f"policy must be 'continuous' or 'static'; got {policy!r}")
        self.engine = engine
        self.executor = executor
        self.max_queue = max_queue
        self.policy = policy
        self._waiting: deque[DecodeRequest] = deque()
        self._streams: dict[int, GenerationStream] = {}
        self._releases: dict[int, Callable[[], None]] = {}
        self._cancelled: set[int] = set()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._step_seconds = 0.05
        self.finished: Counter[str] = Counter()  # requests finished, by reason (stop, length, cancelled, error)

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """Start the loop on the running event loop (``submit`` also starts it)."""
        if self._task is None:
            self._closing = False
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="adapterkit-decode")

    async def stop(self) -> None:
        """Finish every queued and running request, then stop; new submissions are refused."""
        self._closing = True
        if self._task is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            await self._task
            self._task = None

    def submit(self, request: DecodeRequest, release: Callable[[], None] | None = None) -> GenerationStream:
        """Queue a request; its events come from the returned stream. Raises QueueFull."""
        if self._closing:
            raise QueueFull(len(self._waiting), 1)
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(len(self._waiting), max(1, int(self._step_seconds * 16) + 1))
        self.start()
        stream = GenerationStream(request, self)
        self._streams[request.id] = stream
        if release is not None:
            self._releases[request.id] = release
        self._waiting.append(request)
        assert self._wakeup is not None
        self._wakeup.set()
        return stream

    def _cancel(self, rid: int) -> None:
        if rid not in self._streams:  # finished already
            return
        self._cancelled.add(rid)
        if self._wakeup is not None:
            self._wakeup.set()

    def _finish(self, event: TokenEvent) -> None:
        self.finished[event.finish_reason or "error"] += 1
        stream = self._streams.pop(event.request.id, None)
        self._cancelled.discard(event.request.id)
        if stream is not None:
            stream._put(event)
        release = self._releases.pop(event.request.id, None)
        if release is not None:
            release()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            # Cancelled requests that never joined leave the queue at once.
            if self._cancelled and self._waiting:
                for req in [r for r in self._waiting if r.id in self._cancelled]:
                    self._waiting.remove(req)
                    self._finish(TokenEvent(req, None, "", "cancelled"))
            if not self._waiting and not self.engine.active:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            newcomers: list[DecodeRequest] = []
            if self.policy == "continuous" or not self.engine.active:
                while self._waiting and len(newcomers) < self.engine.room:
                    newcomers.append(self._waiting.popleft())
            cancelled = {rid for rid in self._cancelled if rid not in {r.id for r in self._waiting}}
            start = loop.time()
            try:
                events = await loop.run_in_executor(self.executor, self.engine.step, newcomers, cancelled)
            except Exception as e:  # noqa: BLE001 - the executor is gone (shutdown): fail everyone
                pending = [*newcomers, *self._waiting, *(r.request for r in self.engine.rows)]
                self._waiting.clear()
                for req in pending:
                    self._finish(TokenEvent(req, None, "", "error", 0, e))
                return
            self._step_seconds = 0.8 * self._step_seconds + 0.2 * (loop.time() - start)
            for event in events:
                if event.finish_reason is not None:
                    self._finish(event)
                else:
                    stream = self._streams.get(event.request.id)
                    if stream is not None:
                        stream._put(event)
