"""Prefix-tuning adapters in the server, on a tiny llama: continuous decoding prefills each prefix row
with its prefix in the KV cache, then keeps those entries as ordinary cache columns while rows of
other prefix lengths, other kinds and the base join and leave; every greedy row equals transformers'
``generate`` alone. ``/v1/generate`` (``generate`` on the batch) and ``/v1/completions`` serve them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import adapterkit as ak
from adapterkit.serve import ServeConfig, create_app
from adapterkit.serve.decode import DecodeEngine, DecodeRequest, SamplingOptions

from .conftest import minilm_dir, perturb, running

ADAPTERS = {
    "p4": ak.AdapterConfig("prefix", bottleneck_size=4, init_std=0.5),
    "p7": ak.AdapterConfig("prefix", bottleneck_size=7, init_std=0.5),
    "poet": ak.AdapterConfig("houlsby", bottleneck_size=8),
}
PROMPTS = [
    ("p4", "roses are red", 7),
    ("p7", "def main():", 4),
    (None, "once upon a time there was", 9),
    ("poet", "hi", 6),
    ("p7", "the quick brown fox jumps over", 5),
    ("p4", "import numpy as np", 8),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def model(tokenizer) -> ak.AdapterModel:
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, vocab_size=len(tokenizer), max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_config(config).eval()
    base.generation_config.eos_token_id = None  # always generate max_new_tokens tokens
    model = ak.AdapterModel(base).eval()
    for name, cfg in ADAPTERS.items():
        model.add_adapter(name, cfg)
    perturb(model, seed=3, scale=0.3)
    return model


def alone(model: ak.AdapterModel, adapter: str | None, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[adapter],
                         max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, x.shape[1]:].tolist()


def test_prefix_rows_join_and_leave_a_decode_batch_and_equal_alone(model, tokenizer):
    reqs = [DecodeRequest(tokenizer(p)["input_ids"], a, SamplingOptions(max_tokens=n)) for a, p, n in PROMPTS]
    engine = DecodeEngine(model, tokenizer, max_batch_size=4, eos_token_ids=())
    schedule = {0: reqs[:2], 2: reqs[2:4], 3: reqs[4:6]}
    waiting: list[DecodeRequest] = []
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    widths, step = [], 0
    while step <= max(schedule) or engine.active or waiting:
        waiting += schedule.get(step, [])
        joining, waiting = waiting[: engine.room], waiting[engine.room:]
        for e in engine.step(joining):
            assert e.error is None, e.error
            tokens.setdefault(e.request.id, []).append(e.token_id)
            if e.finish_reason:
                finish[e.request.id] = e.finish_reason
        if engine.active:
            widths.append((len({r.request.adapter for r in engine.rows}), engine.mask.shape[1]))
        step += 1
    assert all(finish[r.id] == "length" for r in reqs)
    for r in reqs:
        assert tokens[r.id] == alone(model, r.adapter, r.prompt_ids, r.options.max_tokens), r.adapter
    assert max(n for n, _ in widths) >= 3  # prefix rows of both lengths shared the batch with others
    # the prefixes change the tokens: the same prompt with each adapter and none
    prompt = tokenizer("hello there")["input_ids"]
    assert len({tuple(alone(model, a, prompt, 6)) for a in (None, "p4", "p7")}) == 3


@pytest.fixture(scope="module")
def dirs(model, tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("prefix-llama")
    model.base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    for name in ADAPTERS:
        model.save_adapter(name, folder / "adapters" / f"{name}.safetensors")
    return folder / "base", folder / "adapters"


@pytest.fixture(scope="module")
def server(dirs):
    base, adapters = dirs
    config = ServeConfig(base=str(base), registry=str(adapters), max_batch_size=3, max_wait_ms=1000, max_new_tokens=16)
    with running(create_app(config)) as url:
        yield url


def test_generate_and_completions_serve_prefix_adapters(server, model, tokenizer):
    jobs = [("p4", "roses are red"), ("p7", "def main"), (None, "once upon a time")]

    async def send(path: str, bodies: list[dict]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(client.post(path, json=b) for b in bodies))

    batched = asyncio.run(send("/v1/generate", [{"adapter": a, "prompt": p, "max_new_tokens": 6} for a, p in jobs]))
    completions = asyncio.run(send("/v1/completions", [
        {"model": a or "base", "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True} for a, p in jobs
    ]))
    for (adapter, prompt), b, c in zip(jobs, batched, completions, strict=True):
        assert b.status_code == 200, b.text
        assert c.status_code == 200, c.text
        expected = alone(model, adapter, tokenizer(prompt)["input_ids"], 6)
        assert b.json()["batch_size"] == 3 and b.json()["token_ids"] == expected
        assert c.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert c.json()["usage"]["completion_tokens"] == 6
