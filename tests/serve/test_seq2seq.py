"""seq2seq adapters served on an encoder-decoder base (tiny random T5 and BART): ``/v1/generate`` loads
the folder with its LM head, right-pads the prompts into the encoder, answers with the whole decoded
sequence, and each row of a mixed batch equals ``model.generate`` alone; continuous decoding (the
OpenAI endpoints) refuses an encoder-decoder with a 422 naming the reason."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from tinymodels import tiny_seq2seq_lm, word_tokenizer
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import adapterkit as ak
from adapterkit.serve import ServeConfig, create_app
from adapterkit.serve.decode import DecodeEngine
from adapterkit.serve.runner import ModelRunner, load_base

from .conftest import perturb, running

WORDS = "what does the dog cat cow say tell me please a story about woof meow moo".split()
ADAPTERS = {"animals": ak.AdapterConfig("houlsby", bottleneck_size=8), "stories": ak.AdapterConfig("lora", bottleneck_size=4)}
# the batch's width (9 tokens with EOS) is over 1 + the 5 tokens asked for: an answer cut at the
# prompt's width, as for a decoder, would be empty
PROMPTS = [
    ("animals", "what does the dog say please"),
    ("stories", "tell me a story about the cat please"),
    (None, "what does the cow say"),
]
NEW = 5
# adapter nudges at which these random models answer differently per adapter (and, BART, per prompt)
NUDGE = {"t5": (6, 1.0), "bart": (7, 0.2)}


@pytest.fixture(scope="module", params=["t5", "bart"])
def seq2seq_dirs(request, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny encoder-decoder with its word tokenizer, saved as a folder; two seq2seq adapters for it."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tok = word_tokenizer(WORDS)
    base = tiny_seq2seq_lm(request.param, len(tok))
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    model = ak.AdapterModel(base)
    torch.manual_seed(1)
    for name, config in ADAPTERS.items():
        model.add_adapter(name, config, head="seq2seq")
    seed, scale = NUDGE[request.param]
    perturb(model, seed=seed, scale=scale)
    for name in ADAPTERS:
        model.save_adapter(name, folder / "adapters" / f"{name}.safetensors")
    return folder / "base", folder / "adapters"


@pytest.fixture(scope="module")
def server(seq2seq_dirs):
    base, adapters = seq2seq_dirs
    config = ServeConfig(base=str(base), registry=str(adapters), max_batch_size=3, max_wait_ms=1000, max_new_tokens=8)
    with running(create_app(config)) as url:
        yield url


def generate_alone(dirs: tuple[Path, Path], adapter: str | None, prompt: str, n: int) -> list[int]:
    """transformers' ``generate`` on this prompt alone: the decoder's tokens after its start token, up to
    and including an end-of-sequence token."""
    base_dir, adapters = dirs
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = ak.AdapterModel(AutoModelForSeq2SeqLM.from_pretrained(base_dir)).eval()
    if adapter is not None:
        model.load_adapter(adapters / f"{adapter}.safetensors")
    enc = tok(prompt, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**enc, adapter_names=[adapter], max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    ids = out[0, 1:].tolist()
    return ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids


def test_load_base_takes_the_lm_head_and_pads_the_encoder_on_the_right(seq2seq_dirs):
    model, tok = load_base(seq2seq_dirs[0])
    assert model.base.can_generate() and model.config.is_encoder_decoder
    runner = ModelRunner(model, tok)
    assert runner.can_generate and runner.encoder_decoder and not runner.pad_left
    a, b = runner.encode("what does the dog say"), runner.encode("a story")
    padded = runner._pad([a, b])
    assert padded["attention_mask"][1].tolist() == [1] * len(b.ids) + [0] * (len(a.ids) - len(b.ids))
    # the decoder has positions of its own: a prompt keeps the whole limit whatever max_new_tokens is
    assert len(runner.encode(" ".join(["dog"] * 600), reserve=8).ids) == runner.max_length
    with pytest.raises(ValueError, match="continuous decoding serves decoder-only"):
        DecodeEngine(model, tok)


def test_mixed_batch_answers_equal_generate_alone(server, seq2seq_dirs):
    async def send():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            bodies = [{"adapter": a, "prompt": p, "max_new_tokens": NEW} for a, p in PROMPTS]
            return await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))

    tok = AutoTokenizer.from_pretrained(seq2seq_dirs[0])
    answers = {}
    for (adapter, prompt), r in zip(PROMPTS, asyncio.run(send()), strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["batch_size"] == 3 and 1 <= len(body["token_ids"]) <= NEW
        assert body["token_ids"] == generate_alone(seq2seq_dirs, adapter, prompt, NEW)
        assert body["text"] == tok.decode(body["token_ids"], skip_special_tokens=True)
        answers[adapter] = body["token_ids"]
    # the adapters change the answer: the same prompt with each
    same = {
        a: httpx.post(f"{server}/v1/generate", json={"adapter": a, "prompt": PROMPTS[0][1], "max_new_tokens": NEW},
                      timeout=60).json()["token_ids"]
        for a in ("stories", None)
    }
    assert same["stories"] == generate_alone(seq2seq_dirs, "stories", PROMPTS[0][1], NEW)
    assert len({tuple(answers["animals"]), tuple(same["stories"]), tuple(same[None])}) >= 2


def test_continuous_decoding_refuses_an_encoder_decoder(server):
    body = {"model": "animals", "prompt": "what does the dog say", "max_tokens": 2}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 422 and "encoder-decoder" in r.json()["detail"] and "/v1/generate" in r.json()["detail"]
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{server}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 422 and "encoder-decoder" in r.json()["detail"]
    assert httpx.get(f"{server}/health", timeout=60).json()["can_generate"] is True
