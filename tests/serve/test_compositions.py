"""The server takes compositions in a request ({"adapter": {"stack": [...]}}), batches them with plain
rows in one forward pass, and each answer equals that request run alone in this process."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModel

import adapterkit as ak
from adapterkit.composition import from_json, head_name
from adapterkit.serve import ServeConfig, create_app

from .conftest import perturb, running
from .test_app import TOL, post_all

LABELS = ["neg", "pos", "other"]
ROWS = [
    {"adapter": {"stack": ["domain", "sent"]}, "text": "a great movie, I loved every minute"},
    {"adapter": "sent", "text": "a great movie, I loved every minute"},
    {"adapter": {"average": ["sent", "topic"], "weights": [0.3, 0.7]}, "text": "stocks fell sharply"},
    {"adapter": "topic", "text": "what time does the shop open?"},
    {"adapter": {"stack": ["domain", {"average": ["sent", "topic"]}]}, "text": "hello there"},
]


@pytest.fixture(scope="module")
def composed_reference(minilm):
    model = ak.AdapterModel(AutoModel.from_pretrained(minilm)).eval()
    torch.manual_seed(0)
    model.add_adapter("domain", ak.AdapterConfig("pfeiffer", bottleneck_size=16))
    model.add_adapter("sent", ak.AdapterConfig("lora", bottleneck_size=8), head="classification", labels=LABELS)
    model.add_adapter("topic", ak.AdapterConfig("houlsby", bottleneck_size=8), head="classification", labels=LABELS)
    perturb(model, seed=5, scale=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def composed_server(minilm, composed_reference, tmp_path_factory):
    """A batch runs only when all rows are queued (the ten-minute timer never decides)."""
    folder = tmp_path_factory.mktemp("composed")
    for name in ("domain", "sent", "topic"):
        composed_reference.save_adapter(name, folder / f"{name}.safetensors")
    config = ServeConfig(base=str(minilm), registry=str(folder), max_batch_size=len(ROWS), max_wait_ms=600_000,
                         split_overhead=10**9)
    with running(create_app(config)) as url:
        yield url


def _alone(model, tokenizer, adapter, text: str) -> dict[str, float]:
    entry = from_json(adapter)
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc, adapter_names=[entry]).logits[0]
    labels = model.labels(head_name(entry))
    return dict(zip(labels, torch.softmax(logits[: len(labels)].float(), -1).tolist(), strict=True))


def test_compositions_share_a_batch_with_plain_rows_and_equal_each_alone(composed_server, composed_reference, tokenizer):
    responses = asyncio.run(post_all(composed_server, "/v1/classify", ROWS))
    answers = []
    for body, r in zip(ROWS, responses, strict=True):
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["batch_size"] == len(ROWS)
        assert got["adapter"] == body["adapter"]
        want = _alone(composed_reference, tokenizer, body["adapter"], body["text"])
        assert max(abs(got["scores"][k] - want[k]) for k in want) <= TOL
        answers.append(got["scores"])
    # the stack really differs from its task adapter alone, on the same text
    assert max(abs(answers[0][k] - answers[1][k]) for k in LABELS) > 1e-3


@pytest.mark.parametrize("adapter, status, match", [
    ({"stack": ["sent"]}, 422, "at least two members"),
    ({"parallel": ["sent", "topic"]}, 422, "composition here is"),
    ({"stack": ["domain", "nope"]}, 404, "nope"),
    ({"stack": ["sent", "domain"]}, 422, "last member 'domain'"),
    ({"mix": ["sent", "topic"]}, 422, "composition is"),
    ({"stack": ["../x", "sent"]}, 404, "file stems"),
])
def test_bad_compositions_get_clear_errors(composed_server, adapter, status, match):
    r = asyncio.run(post_all(composed_server, "/v1/classify", [{"adapter": adapter, "text": "hi"}]))[0]
    assert r.status_code == status, r.text
    assert match in r.json()["detail"]


def test_a_hostile_nesting_is_refused(composed_server):
    nested: object = "sent"
    for _ in range(60):
        nested = {"stack": [nested, "topic"]}
    r = asyncio.run(post_all(composed_server, "/v1/classify", [{"adapter": nested, "text": "hi"}]))[0]
    assert r.status_code == 422, r.text
