"""Generation on a decoder base: greedy rows for different adapters share a batch, seeds reproduce."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import adapterkit as ak
from adapterkit.serve import ServeConfig, create_app

from .conftest import running


@pytest.fixture(scope="module")
def llama_server(tiny_llama):
    base, adapters = tiny_llama
    config = ServeConfig(
        base=str(base), registry=str(adapters), max_batch_size=3, max_wait_ms=1000, max_new_tokens=16
    )
    with running(create_app(config)) as url:
        yield url


def generate_alone(tiny_llama, adapter: str | None, prompt: str, n: int) -> list[int]:
    base_dir, adapters = tiny_llama
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = ak.AdapterModel(AutoModelForCausalLM.from_pretrained(base_dir)).eval()
    if adapter is not None:
        model.load_adapter(adapters / f"{adapter}.safetensors")
    enc = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**enc, adapter_names=[adapter], max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_greedy_mixed_batch_equals_alone(llama_server, tiny_llama):
    prompts = [("poet", "roses are red"), ("coder", "def main"), (None, "once upon a time")]

    async def send():
        async with httpx.AsyncClient(base_url=llama_server, timeout=60) as client:
            bodies = [{"adapter": a, "prompt": p, "max_new_tokens": 6} for a, p in prompts]
            return await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))

    responses = asyncio.run(send())
    outputs = {}
    for (adapter, prompt), r in zip(prompts, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["batch_size"] == 3 and len(body["token_ids"]) == 6 and body["seed"] is None
        assert body["token_ids"] == generate_alone(tiny_llama, adapter, prompt, 6)
        outputs[adapter] = body["token_ids"]
    # The adapters do change the model: the same prompt continues differently with each.
    same = [
        httpx.post(
            f"{llama_server}/v1/generate",
            json={"adapter": a, "prompt": "hello", "max_new_tokens": 6},
            timeout=60,
        )
        for a in ("poet", None)
    ]
    assert same[0].json()["token_ids"] != same[1].json()["token_ids"]


def test_sampling_is_reproducible_with_a_seed(llama_server):
    def sample(seed: int) -> list[int]:
        body = {
            "adapter": "poet",
            "prompt": "hello",
            "max_new_tokens": 8,
            "do_sample": True,
            "seed": seed,
            "top_k": 50,
        }
        r = httpx.post(f"{llama_server}/v1/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["seed"] == seed and r.json()["batch_size"] == 1
        return r.json()["token_ids"]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_generate_errors(llama_server):
    too_many = httpx.post(f"{llama_server}/v1/generate", json={"prompt": "x", "max_new_tokens": 17})
    assert too_many.status_code == 422 and "at most 16" in too_many.text
    assert (
        httpx.post(f"{llama_server}/v1/generate", json={"prompt": "x", "max_new_tokens": 0}).status_code
        == 422
    )
    assert (
        httpx.post(f"{llama_server}/v1/generate", json={"adapter": "nope", "prompt": "x"}).status_code == 404
    )
    r = httpx.post(f"{llama_server}/v1/classify", json={"adapter": "poet", "text": "x"}, timeout=60)
    assert r.status_code == 422 and "'lm' task" in r.json()["detail"]
