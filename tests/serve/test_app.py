"""The server over real HTTP on loopback: mixed-task answers, every error case, LRU eviction."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from adapterkit.serve import ServeConfig, create_app
from adapterkit.serve.cache import adapter_bytes

from .conftest import TASKS, running

TOL = 1e-5


def reference_scores(
    model, tokenizer, adapter: str, text: str, pair: str | None = None, **tok
) -> dict[str, float]:
    """The answer for one request run alone (batch of one, no padding), in this process."""
    enc = tokenizer(text, pair, return_tensors="pt", **tok)
    with torch.no_grad():
        logits = model(**enc, adapter_names=[adapter]).logits[0]
    labels = model.labels(adapter)
    return dict(zip(labels, torch.softmax(logits[: len(labels)].float(), -1).tolist(), strict=True))


def assert_scores_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= TOL, f"scores differ by {worst:.2e}: {got} vs {want}"


async def post_all(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


@pytest.fixture(scope="module")
def server(minilm, artifacts):
    """MiniLM; a batch runs when 6 requests are queued (or after 1 s) as one forward pass (never split
    by length); inputs over 64 tokens: 413."""
    config = ServeConfig(
        base=str(minilm),
        registry=str(artifacts),
        max_batch_size=6,
        max_wait_ms=1000,
        max_length=64,
        on_long="reject",
        split_overhead=10**9,
    )
    with running(create_app(config)) as url:
        yield url


# -- cross-task batching -----------------------------------------------------------------------------


MIXED = [
    {"adapter": "sentiment", "text": "a great movie, I loved every minute"},
    {"adapter": "topic", "text": "stocks fell sharply after the announcement"},
    {"adapter": "intent", "text": "hello there"},
    {"adapter": "nli", "text": "A man is playing a guitar.", "text_pair": "Someone makes music."},
    {"adapter": "sentiment", "text": "terrible plot and worse acting, truly a waste of an evening"},
    {"adapter": "topic", "text": "the match was won in extra time"},
]


@pytest.fixture(scope="module")
def full_batch_server(minilm, artifacts):
    """A batch runs only when 6 requests are queued: the timer (ten minutes) never decides, so however
    slowly a loaded machine delivers the six requests, they share one forward pass."""
    config = ServeConfig(
        base=str(minilm), registry=str(artifacts), max_batch_size=len(MIXED), max_wait_ms=600_000,
        split_overhead=10**9,
    )
    with running(create_app(config)) as url:
        yield url


def test_mixed_batch_equals_one_at_a_time(full_batch_server, reference, tokenizer):
    responses = asyncio.run(post_all(full_batch_server, "/v1/classify", MIXED))
    for body, r in zip(MIXED, responses, strict=True):
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["batch_size"] == len(MIXED)  # all six tasks' rows shared one forward pass
        want = reference_scores(reference, tokenizer, body["adapter"], body["text"], body.get("text_pair"))
        assert_scores_close(got["scores"], want)
        assert got["label"] == max(want, key=want.get)
        assert got["adapter"] == body["adapter"] and got["truncated"] is False


def test_tag_matches_reference(server, reference, tokenizer):
    text = "Ada Lovelace lived in London"
    r = httpx.post(f"{server}/v1/tag", json={"adapter": "ner", "text": text}, timeout=60)
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(reference(**enc, adapter_names=["ner"]).logits[0], -1)  # (T, 3)
    inner = probs[1:-1]  # without [CLS] and [SEP]
    assert len(tokens) == inner.shape[0]
    for token, p in zip(tokens, inner, strict=True):
        assert text[token["start"] : token["end"]].lower() == token["token"].removeprefix("##")
        want = dict(zip(["O", "PER", "LOC"], p.tolist(), strict=True))
        assert_scores_close(token["scores"], want)
        assert token["label"] == max(want, key=want.get)


# -- errors ------------------------------------------------------------------------------------------


def test_unknown_adapter_is_404(server):
    for name in ("nope", "../sentiment", "sub/sentiment"):
        r = httpx.post(f"{server}/v1/classify", json={"adapter": name, "text": "x"})
        assert r.status_code == 404, (name, r.text)
        assert "no adapter" in r.json()["detail"]


def test_other_base_model_is_409_with_both_fingerprints(server):
    r = httpx.post(f"{server}/v1/classify", json={"adapter": "alien", "text": "x"}, timeout=60)
    assert r.status_code == 409, r.text
    body = r.json()
    base_id = httpx.get(f"{server}/health").json()["base"]
    assert body["expected"]["id"] == base_id
    assert body["found"]["id"] != base_id and body["found"]["model_type"] == "bert"
    assert base_id in body["detail"] and body["found"]["id"] in body["detail"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/classify", {"text": "no adapter"}),
        ("/v1/classify", {"adapter": "sentiment"}),
        ("/v1/classify", {"adapter": "sentiment", "text": 12}),
        ("/v1/classify", {"adapter": "", "text": "x"}),
        ("/v1/classify", {"adapter": "sentiment", "text": "x", "lables": 2}),
        ("/v1/classify", {"adapter": "ner", "text": "a token task on the sequence endpoint"}),
        ("/v1/tag", {"adapter": "sentiment", "text": "a sequence task on the token endpoint"}),
        ("/v1/generate", {"prompt": "an encoder cannot generate"}),
        ("/v1/adapters", {"name": "sentiment"}),
    ],
)
def test_malformed_requests_are_422(server, path, body):
    r = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert r.status_code == 422, r.text


def test_invalid_json_is_422(server):
    r = httpx.post(
        f"{server}/v1/classify", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422


def test_too_long_input_is_413_when_rejecting(server):
    r = httpx.post(f"{server}/v1/classify", json={"adapter": "sentiment", "text": "word " * 200})
    assert r.status_code == 413, r.text
    assert "64" in r.json()["detail"]


def test_broken_artifact_is_422_with_reason_and_no_server_path(server, artifacts):
    r = httpx.post(f"{server}/v1/classify", json={"adapter": "broken", "text": "x"}, timeout=60)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "'broken'" in detail and "safetensors" in detail
    assert str(artifacts) not in r.text and "/tmp" not in r.text


# -- managing adapters, health, metrics --------------------------------------------------------------


def test_load_list_unload(server):
    r = httpx.post(f"{server}/v1/adapters", json={"adapter": "intent"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == TASKS["intent"][2] and r.json()["task"] == "classification"
    listed = httpx.get(f"{server}/v1/adapters", params={"available": "true"}).json()
    assert "intent" in [a["adapter"] for a in listed["loaded"]]
    assert {"sentiment", "topic", "intent", "nli", "ner"} <= set(listed["available"])
    assert httpx.delete(f"{server}/v1/adapters/intent", timeout=60).status_code == 200
    assert "intent" not in [a["adapter"] for a in httpx.get(f"{server}/v1/adapters").json()["loaded"]]
    assert httpx.delete(f"{server}/v1/adapters/intent", timeout=60).status_code == 404
    assert httpx.post(f"{server}/v1/adapters", json={"adapter": "nope"}, timeout=60).status_code == 404


def test_health_metrics_and_docs(server):
    httpx.post(f"{server}/v1/adapters", json={"adapter": "sentiment"}, timeout=60)
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["on_long"] == "reject" and health.json()["max_length"] == 64
    text = httpx.get(f"{server}/metrics").text
    for needle in (
        'adapterkit_requests_total{endpoint="/v1/adapters",status="200"}',
        "# TYPE adapterkit_request_seconds histogram",
        'adapterkit_request_seconds_bucket{endpoint="/health",le="+Inf"}',
        "# TYPE adapterkit_batch_size histogram",
        "adapterkit_queue_depth 0",
        "adapterkit_adapters_loaded ",
        "adapterkit_adapter_loads_total ",
    ):
        assert needle in text, needle
    assert httpx.get(f"{server}/docs").status_code == 200
    assert "/v1/classify" in httpx.get(f"{server}/openapi.json").json()["paths"]


# -- a hub registry, LRU eviction, truncation ---------------------------------------------------------


@pytest.fixture(scope="module")
def lru_server(minilm, artifacts, reference, tmp_path_factory):
    """A LocalRegistry holding three tasks; room for two of them; long inputs truncated to 16 tokens."""
    from adapterkit.hub import LocalRegistry

    registry = LocalRegistry(tmp_path_factory.mktemp("registry"))
    for name in ("sentiment", "topic", "intent"):
        registry.publish(artifacts / f"{name}.safetensors", f"team/{name}")
    sizes = {name: adapter_bytes(reference.adapters[name]) for name in ("sentiment", "topic", "intent")}
    budget = sizes["sentiment"] + sizes["topic"]  # any two fit, all three do not
    assert sizes["intent"] <= sizes["sentiment"] and sizes["intent"] > 0
    config = ServeConfig(
        base=str(minilm),
        registry=str(registry.root),
        max_batch_size=8,
        max_wait_ms=2,
        memory_budget=budget,
        max_length=16,
        on_long="truncate",
    )
    with running(create_app(config)) as url:
        yield url


def loaded(url: str) -> list[str]:
    return [a["adapter"] for a in httpx.get(f"{url}/v1/adapters").json()["loaded"]]


def test_lru_eviction_under_memory_budget(lru_server, reference, tokenizer):
    text = "the markets rallied on good news"
    for name in ("sentiment", "topic", "intent"):
        r = httpx.post(
            f"{lru_server}/v1/classify", json={"adapter": f"team/{name}@1", "text": text}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert_scores_close(r.json()["scores"], reference_scores(reference, tokenizer, name, text))
    assert loaded(lru_server) == ["team/topic@1", "team/intent@1"]  # sentiment was least recently used
    # Using topic makes intent the least recently used; sentiment comes back in its place.
    httpx.post(f"{lru_server}/v1/classify", json={"adapter": "team/topic@1", "text": text}, timeout=60)
    r = httpx.post(
        f"{lru_server}/v1/classify", json={"adapter": "team/sentiment@1", "text": text}, timeout=60
    )
    assert_scores_close(r.json()["scores"], reference_scores(reference, tokenizer, "sentiment", text))
    assert loaded(lru_server) == ["team/topic@1", "team/sentiment@1"]
    listing = httpx.get(f"{lru_server}/v1/adapters").json()
    assert listing["used_bytes"] <= listing["budget_bytes"]
    metrics = httpx.get(f"{lru_server}/metrics").text
    assert "adapterkit_adapter_evictions_total 2" in metrics
    assert "adapterkit_adapter_loads_total 4" in metrics


def test_registry_errors(lru_server):
    r = httpx.post(f"{lru_server}/v1/classify", json={"adapter": "team/nope", "text": "x"}, timeout=60)
    assert r.status_code == 404, r.text
    r = httpx.post(f"{lru_server}/v1/classify", json={"adapter": "team/topic@7", "text": "x"}, timeout=60)
    assert r.status_code == 404, r.text
    r = httpx.post(f"{lru_server}/v1/classify", json={"adapter": "Not A Ref!", "text": "x"}, timeout=60)
    assert r.status_code == 422, r.text


def test_long_input_is_truncated_when_configured(lru_server, reference, tokenizer):
    text = "an endless review that goes on and on " * 20
    r = httpx.post(f"{lru_server}/v1/classify", json={"adapter": "team/topic@1", "text": text}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] is True
    want = reference_scores(reference, tokenizer, "topic", text, truncation=True, max_length=16)
    assert_scores_close(r.json()["scores"], want)


# -- overload --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_queue_server(minilm, artifacts):
    config = ServeConfig(
        base=str(minilm),
        registry=str(artifacts),
        adapters=["sentiment"],
        max_batch_size=8,
        # The two queued requests wait this long for company; the third follows them after one
        # /health round trip, so this is a margin of many seconds, not a race (it only makes the test
        # last this long). A batch that could never run would lose the first two requests.
        max_wait_ms=15_000,
        max_queue=2,
    )
    with running(create_app(config)) as url:
        yield url


def test_full_queue_is_503_with_retry_after(tiny_queue_server):
    url = tiny_queue_server

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"adapter": "sentiment", "text": "queued"}
            first = [asyncio.create_task(client.post("/v1/classify", json=body)) for _ in range(2)]
            deadline = time.monotonic() + 30
            while (await client.get("/health")).json()["queue_depth"] < 2:  # both are waiting for company
                assert time.monotonic() < deadline, "requests never queued"
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/classify", json=body)
            return refused, await asyncio.gather(*first)

    refused, first = asyncio.run(scenario())
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in first] == [200, 200]
    assert "adapterkit_queue_rejected_total 1" in httpx.get(f"{url}/metrics").text


# -- a hub server as the registry ----------------------------------------------------------------------


def test_remote_hub_registry(minilm, artifacts, reference, tokenizer, tmp_path, monkeypatch):
    from adapterkit.hub import LocalRegistry
    from adapterkit.hub.server import create_app as create_hub

    monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path / "home"))  # RemoteRegistry's download cache
    registry = LocalRegistry(tmp_path / "hub")
    registry.publish(artifacts / "topic.safetensors", "team/topic")
    with running(create_hub(registry.root)) as hub_url:
        config = ServeConfig(base=str(minilm), registry=hub_url, max_wait_ms=2)
        with running(create_app(config)) as url:
            text = "the striker scored twice"
            r = httpx.post(
                f"{url}/v1/classify", json={"adapter": "hub:team/topic@1", "text": text}, timeout=60
            )
            assert r.status_code == 200, r.text
            assert_scores_close(r.json()["scores"], reference_scores(reference, tokenizer, "topic", text))
            r = httpx.post(f"{url}/v1/classify", json={"adapter": "team/missing", "text": text}, timeout=60)
            assert r.status_code == 404, r.text
