"""The OpenAI-compatible endpoints on a real server on loopback: greedy answers equal transformers'
``generate`` alone, streamed (server-sent events) and whole answers agree, requests with different
adapters share the decode batch, the official ``openai`` client works, bad requests get clear errors."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import adapterkit as ak
from adapterkit.serve import ServeConfig, create_app

from .conftest import running

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def llama_dir(tiny_llama, tmp_path_factory):
    """The tiny llama of conftest, its tokenizer given a chat template."""
    base, adapters = tiny_llama
    folder = tmp_path_factory.mktemp("chat") / "tinyllama"
    shutil.copytree(base, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder, adapters


@pytest.fixture(scope="module")
def server(llama_dir):
    base, adapters = llama_dir
    app = create_app(ServeConfig(base=str(base), registry=str(adapters), max_batch_size=8, max_new_tokens=24))
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def reference(llama_dir):
    base, adapters = llama_dir
    model = ak.AdapterModel(AutoModelForCausalLM.from_pretrained(base)).eval()
    for name in ("poet", "coder"):
        model.load_adapter(adapters / f"{name}.safetensors")
    return model, AutoTokenizer.from_pretrained(base)


def alone(reference, adapter: str | None, ids: list[int], n: int) -> tuple[list[int], str]:
    model, tok = reference
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[adapter],
                         max_new_tokens=n, do_sample=False, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def sse(response: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completions_greedy_equal_alone_while_sharing_the_batch(server, reference):
    url, app = server
    _, tok = reference
    jobs = [("poet", "roses are red", 12), ("coder", "def main", 5), ("base", "once upon a time", 9),
            ("poet", "hello", 3)]

    async def send():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            bodies = [{"model": m, "prompt": p, "max_tokens": n, "temperature": 0} for m, p, n in jobs]
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    steps_before = app.state.decode.engine.steps
    responses = asyncio.run(send())
    for (model, prompt, n), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        ids = tok(prompt)["input_ids"]
        tokens, text = alone(reference, None if model == "base" else model, ids, n)
        choice = body["choices"][0]
        assert body["object"] == "text_completion" and body["model"] == model
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
    # Four requests of 12 + 5 + 9 + 3 tokens took fewer decode steps than run one after another.
    assert app.state.decode.engine.steps - steps_before < 12 + 5 + 9 + 3 - 4


def test_streamed_completion_adds_up_to_the_whole(server, reference):
    url, _ = server
    body = {"model": "coder", "prompt": "import numpy", "max_tokens": 10, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    r = httpx.post(f"{url}/v1/completions", json={**body, "stream": True,
                                                   "stream_options": {"include_usage": True}}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) > 1 and "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert events[-2]["usage"]["completion_tokens"] == 10


def test_chat_completion_uses_the_chat_template(server, reference):
    url, _ = server
    _, tok = reference
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = httpx.post(f"{url}/v1/chat/completions",
                   json={"model": "poet", "messages": messages, "max_tokens": 7, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    _, expected = alone(reference, "poet", tok(text, add_special_tokens=False)["input_ids"], 7)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    streamed = sse(httpx.post(f"{url}/v1/chat/completions", json={
        "model": "poet", "messages": messages, "max_tokens": 7, "temperature": 0, "stream": True}, timeout=60))
    deltas = [e["choices"][0]["delta"] for e in streamed[:-1]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == expected


def test_stop_strings_and_seeds(server, reference):
    url, _ = server
    body = {"model": "base", "prompt": "the weather today", "max_tokens": 12, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    stop = whole.split()[2]
    cut = httpx.post(f"{url}/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == whole[: whole.index(stop)]
    sampled = {**body, "temperature": 1.0, "top_k": 40, "seed": 11}
    a, b = (httpx.post(f"{url}/v1/completions", json=sampled, timeout=60).json()["choices"][0]["text"] for _ in range(2))
    c = httpx.post(f"{url}/v1/completions", json={**sampled, "seed": 12}, timeout=60).json()["choices"][0]["text"]
    assert a == b and a != c


def test_models_list_and_errors(server):
    url, _ = server
    httpx.post(f"{url}/v1/completions", json={"model": "poet", "prompt": "x", "max_tokens": 1}, timeout=60)
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    assert ids[0] == "base" and "poet" in ids
    cases = [
        ({"model": "nobody", "prompt": "x"}, 404),
        ({"model": "poet", "prompt": "x", "n": 2}, 422),
        ({"model": "poet", "prompt": "x", "logprobs": 2}, 422),
        ({"model": "poet", "prompt": "x", "max_tokens": 25}, 422),  # over the server's 24
        ({"model": "poet", "prompt": "x", "temperature": -1}, 422),
        ({"model": "poet", "prompt": "x", "best_of": 3}, 422),  # unknown option
        ({"model": "poet", "prompt": ["a", "b"]}, 422),
        ({"model": "poet", "prompt": [10**9]}, 422),
        ({"model": "poet", "prompt": "x", "stop": [""]}, 422),
        ({"model": "poet", "prompt": "x" * 600, "max_tokens": 24}, 200),  # truncated to fit, by default
    ]
    for body, status in cases:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "poet", "messages": []}, timeout=60)
    assert r.status_code == 422


def test_the_openai_client(server, reference):
    openai = pytest.importorskip("openai")
    url, _ = server
    _, tok = reference
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    out = client.completions.create(model="coder", prompt="def main", max_tokens=6, temperature=0)
    _, expected = alone(reference, "coder", tok("def main")["input_ids"], 6)
    assert out.choices[0].text == expected and out.usage.completion_tokens == 6
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="poet", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0, stream=True)
        if c.choices]
    whole = client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=5, temperature=0)
    assert "".join(pieces) == whole.choices[0].message.content
    assert [m.id for m in client.models.list()][0] == "base"


def test_a_client_that_leaves_frees_its_row(server):
    """A streaming client that disconnects after its first chunk: its row leaves the batch (and its
    adapter is unpinned), while the server goes on answering."""
    url, app = server
    decode = app.state.decode
    cancelled = decode.finished["cancelled"]

    async def leave_early():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"model": "coder", "prompt": "a long story", "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # leave after the first chunk

    asyncio.run(leave_early())

    async def idle():
        while decode.engine.active or decode._streams:
            await asyncio.sleep(0.01)

    # the row goes at the next step; wait for that state (bounded only by the test timeout)
    future = asyncio.run_coroutine_threadsafe(idle(), _server_loop(app))
    future.result(timeout=60)
    assert decode.finished["cancelled"] == cancelled + 1
    r = httpx.post(f"{url}/v1/completions", json={"model": "coder", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    loaded = httpx.get(f"{url}/v1/adapters", timeout=30).json()["loaded"]
    assert all(e["in_use"] == 0 for e in loaded)


def _server_loop(app):
    return app.state.decode._task.get_loop()
