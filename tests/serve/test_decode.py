"""Continuous batching: rows with their own adapters join and leave one decode batch, and each greedy
row's tokens equal the same request generated alone (by the engine alone and by transformers'
``generate``). Sampling, stop strings, end-of-sequence tokens and cancellation, row by row."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import adapterkit as ak
from adapterkit.serve.decode import (
    DecodeEngine,
    DecodeLoop,
    DecodeRequest,
    SamplingOptions,
    _stop_prefix,
    sample,
)

from .conftest import minilm_dir, perturb

ADAPTERS = {
    "poet": ak.AdapterConfig("houlsby", bottleneck_size=8),
    "coder": ak.AdapterConfig("pfeiffer", bottleneck_size=4),
    "chef": ak.AdapterConfig("parallel", bottleneck_size=8, activation="relu"),
}
PROMPTS = [
    ("poet", "roses are red", 7),
    ("coder", "def main():", 4),
    (None, "once upon a time there was", 9),
    ("chef", "hi", 6),
    ("poet", "the quick brown fox jumps over", 5),
    ("coder", "import numpy as np", 8),
    ("chef", "a recipe for bread needs flour water and", 3),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def model(tokenizer) -> ak.AdapterModel:
    """A tiny random llama with three adapters of different kinds and widths (and the bare base)."""
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, vocab_size=len(tokenizer), max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = ak.AdapterModel(base).eval()
    for name, cfg in ADAPTERS.items():
        model.add_adapter(name, cfg)
    perturb(model, seed=3, scale=0.2)
    return model


def requests(tokenizer, options: dict | None = None) -> list[DecodeRequest]:
    return [
        DecodeRequest(tokenizer(p)["input_ids"], a, SamplingOptions(max_tokens=n, **(options or {})))
        for a, p, n in PROMPTS
    ]


_ALONE: dict[tuple, list[int]] = {}


def hf_alone(model: ak.AdapterModel, req: DecodeRequest) -> list[int]:
    """transformers' own greedy ``generate`` on this request alone (memoised: tests reuse prompts)."""
    key = (id(model), req.adapter, tuple(req.prompt_ids), req.options.max_tokens)
    if key not in _ALONE:
        _ALONE[key] = _hf_alone(model, req)
    return _ALONE[key]


def _hf_alone(model: ak.AdapterModel, req: DecodeRequest) -> list[int]:
    ids = torch.tensor([req.prompt_ids])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[req.adapter],
        max_new_tokens=req.options.max_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
    )
    return out[0, ids.shape[1]:].tolist()


def run(engine: DecodeEngine, schedule: dict[int, list[DecodeRequest]], cancel: dict[int, set[int]] | None = None):
    """Step the engine, adding ``schedule[step]`` before that step; returns per request id its tokens,
    text, finish reason, and per step the adapters in the decode batch."""
    tokens: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    batches: list[list[str | None]] = []
    step = 0
    while step <= max(schedule) or engine.active:
        events = engine.step(schedule.get(step, []), (cancel or {}).get(step, set()))
        batches.append([r.request.adapter for r in engine.rows])
        for e in events:
            if e.token_id is not None and e.finish_reason not in ("cancelled", "error"):
                if not (e.finish_reason == "stop" and e.token_id in engine.eos):
                    tokens.setdefault(e.request.id, []).append(e.token_id)
            text[e.request.id] = text.get(e.request.id, "") + e.text
            if e.finish_reason is not None:
                assert e.request.id not in finish, "a request finished twice"
                finish[e.request.id] = e.finish_reason
        step += 1
    return tokens, text, finish, batches


def test_rows_join_and_leave_and_equal_each_alone(model, tokenizer):
    reqs = requests(tokenizer)
    engine = DecodeEngine(model, tokenizer, max_batch_size=4, eos_token_ids=())
    # Two rows start; more join while they decode; the batch is full (4) at times, so one waits.
    schedule = {0: reqs[:2], 2: reqs[2:4], 3: reqs[4:5], 5: reqs[5:7]}
    waiting: list[DecodeRequest] = []
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    batches = []
    step = 0
    while step <= max(schedule) or engine.active or waiting:
        waiting += schedule.get(step, [])
        joining, waiting = waiting[: engine.room], waiting[engine.room:]
        before = {id(r.request) for r in engine.rows}
        for e in engine.step(joining):
            tokens.setdefault(e.request.id, []).append(e.token_id)
            if e.finish_reason:
                finish[e.request.id] = e.finish_reason
        batches.append((before, [r.request.adapter for r in engine.rows]))
        step += 1
    assert all(finish[r.id] == "length" for r in reqs)
    for r in reqs:
        assert tokens[r.id] == hf_alone(model, r), (r.adapter, r.prompt_ids)
        alone, _, _, _ = run(DecodeEngine(model, tokenizer, eos_token_ids=()), {0: [r]})
        assert tokens[r.id] == alone[r.id]
    # It was one decode batch with rows coming and going: several adapters at once, the batch full,
    # and rows joining while earlier ones were mid-way.
    assert max(len(set(names)) for _, names in batches) >= 3
    assert max(len(names) for _, names in batches) == 4
    assert any(before and len(names) > len(before) for before, names in batches)
    assert engine.active == 0 and engine.cache is None


def test_adapters_change_the_tokens(model, tokenizer):
    prompt = tokenizer("hello there")["input_ids"]
    reqs = [DecodeRequest(prompt, a, SamplingOptions(max_tokens=6)) for a in (None, *ADAPTERS)]
    tokens, _, _, _ = run(DecodeEngine(model, tokenizer, eos_token_ids=()), {0: reqs})
    assert len({tuple(tokens[r.id]) for r in reqs}) == len(reqs)


def test_seeded_sampling_is_the_rows_own(model, tokenizer):
    """A sampled row with a seed draws the same tokens alone and among other rows (its own
    generator), and its options (temperature, top-k, top-p) are its own."""
    opts = dict(temperature=1.3, top_k=50, top_p=0.95)

    def sampled(seed: int) -> DecodeRequest:
        return DecodeRequest(tokenizer("sample me")["input_ids"], "coder", SamplingOptions(max_tokens=12, seed=seed, **opts))

    a, b, c = sampled(7), sampled(7), sampled(8)
    alone, _, _, _ = run(DecodeEngine(model, tokenizer, eos_token_ids=()), {0: [a]})
    greedy = requests(tokenizer)
    mixed, _, _, _ = run(DecodeEngine(model, tokenizer, eos_token_ids=()), {0: greedy[:3], 1: [b, c], 2: greedy[3:]})
    assert mixed[b.id] == alone[a.id]
    assert mixed[c.id] != mixed[b.id]
    for r in greedy:  # the sampled rows did not disturb the greedy ones
        assert mixed[r.id] == hf_alone(model, r)


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -2.0, 1.0])
    g = torch.Generator().manual_seed(0)
    # top_k=1 and a tiny top_p both leave only the argmax.
    assert {sample(logits, SamplingOptions(temperature=5.0, top_k=1), g) for _ in range(20)} == {1}
    assert {sample(logits, SamplingOptions(temperature=5.0, top_p=0.01), g) for _ in range(20)} == {1}
    # top_k=2 draws only from the two best; top_p=0.6 likewise here (p(1) < 0.6 <= p(1) + p(2)).
    assert {sample(logits, SamplingOptions(temperature=1.0, top_k=2), g) for _ in range(200)} == {1, 2}
    assert {sample(logits, SamplingOptions(temperature=1.0, top_p=0.6), g) for _ in range(200)} == {1, 2}
    assert {sample(logits, SamplingOptions(temperature=100.0), g) for _ in range(400)} == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=0),
     dict(top_p=0.0), dict(top_p=1.5), dict(stop=("",))],
)
def test_bad_options_fail_clearly(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingOptions(**kwargs)


def test_stop_prefix():
    assert _stop_prefix("hello wor", ["world"]) == 3
    assert _stop_prefix("hello", ["world"]) == 0
    assert _stop_prefix("ab", ["abc", "bx"]) == 2
    assert _stop_prefix("x", []) == 0


def test_stop_strings_and_streamed_text(model, tokenizer):
    """Each row's text streams in pieces that add up to its whole text; a stop string ends the row
    before it (its own stop strings: the other rows run on)."""
    reqs = requests(tokenizer)
    full_tokens, full_text, _, _ = run(DecodeEngine(model, tokenizer, eos_token_ids=()), {0: reqs})
    for r in reqs:
        assert full_text[r.id] == tokenizer.decode(full_tokens[r.id], skip_special_tokens=True)
    target = reqs[2]  # 9 tokens of the base model
    whole = full_text[target.id]
    words = whole.split()
    stop = " ".join(words[2:4])  # a stop string that starts mid-text and may span tokens
    cut = whole.index(stop)
    stopped = DecodeRequest(target.prompt_ids, None, SamplingOptions(max_tokens=9, stop=("never there", stop)))
    others = requests(tokenizer)
    _, text, finish, _ = run(DecodeEngine(model, tokenizer, eos_token_ids=()), {0: [stopped, *others]})
    assert finish[stopped.id] == "stop" and text[stopped.id] == whole[:cut]
    assert all(finish[r.id] == "length" and text[r.id] == full_text[q.id] for r, q in zip(others, reqs, strict=True))


def test_end_of_sequence_ends_a_row(model, tokenizer):
    reqs = requests(tokenizer)
    plain, _, _, _ = run(DecodeEngine(model, tokenizer, eos_token_ids=()), {0: reqs})
    target = reqs[2]
    eos = plain[target.id][3]  # the row's 4th token, declared an end-of-sequence token
    first = plain[target.id].index(eos)
    again = requests(tokenizer)
    tokens, text, finish, _ = run(DecodeEngine(model, tokenizer, eos_token_ids={eos}), {0: again})
    t = again[2]
    assert finish[t.id] == "stop" and tokens[t.id] == plain[target.id][:first]
    assert text[t.id] == tokenizer.decode(plain[target.id][:first], skip_special_tokens=True)
    ignoring = DecodeRequest(target.prompt_ids, None, SamplingOptions(max_tokens=9, ignore_eos=True))
    tokens, _, finish, _ = run(DecodeEngine(model, tokenizer, eos_token_ids={eos}), {0: [ignoring]})
    assert tokens[ignoring.id] == plain[target.id] and finish[ignoring.id] == "length"


def test_cancelled_row_leaves_and_others_continue(model, tokenizer):
    reqs = requests(tokenizer)
    victim = reqs[2]
    tokens, _, finish, batches = run(
        DecodeEngine(model, tokenizer, eos_token_ids=()), {0: reqs[:4], 1: reqs[4:]}, cancel={3: {victim.id}}
    )
    assert finish[victim.id] == "cancelled"
    assert len(tokens[victim.id]) < victim.options.max_tokens
    for r in reqs:
        if r is not victim:
            assert tokens[r.id] == hf_alone(model, r)


def test_a_failed_prefill_fails_only_its_rows(model, tokenizer):
    reqs = requests(tokenizer)
    bad = DecodeRequest(tokenizer("no such adapter")["input_ids"], "nobody", SamplingOptions(max_tokens=3))
    engine = DecodeEngine(model, tokenizer, eos_token_ids=())
    events = engine.step(reqs[:2])
    events += engine.step([bad])
    failed = [e for e in events if e.request is bad]
    assert len(failed) == 1 and failed[0].finish_reason == "error" and "nobody" in str(failed[0].error)
    tokens, _, _, _ = run(engine, {0: reqs[2:]})
    for r in reqs[2:]:
        assert tokens[r.id] == hf_alone(model, r)


def test_decode_loop_streams_requests_that_arrive_while_others_run(model, tokenizer):
    """The asyncio side: a request submitted after another one's first token joins its batch; every
    stream delivers its own tokens, equal to each request alone, and a release runs after each."""
    reqs = requests(tokenizer)
    released: list[int] = []

    async def main():
        executor = ThreadPoolExecutor(max_workers=1)
        loop = DecodeLoop(DecodeEngine(model, tokenizer, max_batch_size=8, eos_token_ids=()), executor)
        seen_batch: list[int] = []

        async def consume(stream):
            out = []
            async for e in stream:
                seen_batch.append(loop.engine.active)
                if e.token_id is not None:
                    out.append(e.token_id)
            return out

        first = loop.submit(reqs[2], release=lambda: released.append(reqs[2].id))
        events = aiter(first)
        head = await anext(events)  # the first request is running: the others join it mid-way
        rest = [loop.submit(r, release=lambda r=r: released.append(r.id)) for r in reqs if r is not reqs[2]]

        async def first_rest():
            out = [head.token_id]
            async for e in events:
                out.append(e.token_id)
            return out

        results = await asyncio.gather(first_rest(), *(consume(s) for s in rest))
        await loop.stop()
        executor.shutdown()
        return results, seen_batch

    results, seen = asyncio.run(main())
    ordered = [reqs[2]] + [r for r in reqs if r is not reqs[2]]
    for r, got in zip(ordered, results, strict=True):
        assert got == hf_alone(model, r)
    assert max(seen) > 1
    assert sorted(released) == sorted(r.id for r in reqs)


def test_a_finished_rows_slot_is_taken_in_place_and_free_slots_are_compacted(model, tokenizer):
    """A row that finishes frees its cache row; a newcomer takes it in place (the cache keeps its
    batch size), a prompt wider than the cache pads it on the left, and once a quarter of the slots
    are free with no newcomer the cache shrinks to the running rows; every row still equals alone."""
    def req(adapter, text, n):
        return DecodeRequest(tokenizer(text)["input_ids"], adapter, SamplingOptions(max_tokens=n))

    first = [req("poet", "hi", 2), req("coder", "def f", 9), req(None, "a b", 4), req("chef", "bread", 9),
             req("coder", "x", 9)]
    engine = DecodeEngine(model, tokenizer, max_batch_size=5, eos_token_ids=())
    tokens: dict[int, list[int]] = {}

    def step(newcomers=()):
        for e in engine.step(list(newcomers)):
            tokens.setdefault(e.request.id, []).append(e.token_id)

    step(first)  # the poet row has its 2 tokens (prefill, decode): its slot is free, the cache has 5 rows
    free = [i for i, r in enumerate(engine.slots) if r is None]
    assert len(free) == 1 and engine.active == 4 and _kv_rows(engine) == 5
    width = engine.mask.shape[1]
    wide = req("poet", "the quick brown fox jumps over the lazy dog again and again", 3)
    assert len(wide.prompt_ids) > width
    step([wide])  # it takes the free slot in place; its prompt is wider than the cache: padded on the left
    assert engine.slots[free[0]].request is wide and _kv_rows(engine) == 5
    assert engine.mask.shape[1] == len(wide.prompt_ids) + 1
    step()  # the wide row (3 tokens) and the base row (4) are done: 2 of 5 slots free, so the cache
    assert engine.active == 3 and len(engine.slots) == 3 and _kv_rows(engine) == 3  # shrinks to 3 rows
    while engine.active:
        step()
    assert engine.cache is None
    for r in [*first, wide]:
        assert tokens[r.id] == hf_alone(model, r), r.adapter


def _kv_rows(engine: DecodeEngine) -> int:
    from adapterkit.serve.decode import _kv_pairs

    return _kv_pairs(engine.cache)[0][0].shape[0]

