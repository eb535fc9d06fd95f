"""The server batches rows of different adapter kinds (LoRA, DoRA, IA3, prefix, bottlenecks) into one forward pass,
and each answer equals that request run alone in this process."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModel

import adapterkit as ak
from adapterkit.serve import ServeConfig, create_app

from .conftest import perturb, running
from .test_app import assert_scores_close, post_all, reference_scores

KINDS = {
    "lora8": ak.AdapterConfig("lora", bottleneck_size=8, alpha=16, targets=["q", "v"]),
    "lora32": ak.AdapterConfig("lora", bottleneck_size=32, targets=["q", "k", "v", "o", "up", "down"]),
    "ia3": ak.AdapterConfig("ia3"),
    "houlsby": ak.AdapterConfig("houlsby", bottleneck_size=16),
    "dora": ak.AdapterConfig("lora", bottleneck_size=4, targets=["q", "v", "down"], dora=True),
    "prefix": ak.AdapterConfig("prefix", bottleneck_size=6),
}
LABELS = ["neg", "pos", "other"]
ROWS = [
    {"adapter": "lora8", "text": "a great movie, I loved every minute"},
    {"adapter": "ia3", "text": "stocks fell sharply after the announcement"},
    {"adapter": "houlsby", "text": "hello there"},
    {"adapter": "lora32", "text": "terrible plot and worse acting, truly a waste of an evening"},
    {"adapter": "lora8", "text": "the match was won in extra time"},
    {"adapter": "ia3", "text": "what time does the shop open?"},
    {"adapter": "prefix", "text": "the orchestra played a new symphony"},
    {"adapter": "dora", "text": "rain is expected over the weekend"},
]


@pytest.fixture(scope="module")
def kinds_reference(minilm):
    model = ak.AdapterModel(AutoModel.from_pretrained(minilm)).eval()
    torch.manual_seed(0)
    for name, config in KINDS.items():
        model.add_adapter(name, config, head="classification", labels=LABELS)
    perturb(model, seed=4, scale=0.1)  # LoRA's B and IA3's vectors start as the identity
    return model.eval()


@pytest.fixture(scope="module")
def kinds_server(minilm, kinds_reference, tmp_path_factory):
    """A batch runs only when all rows are queued (the ten-minute timer never decides)."""
    folder = tmp_path_factory.mktemp("kinds")
    for name in KINDS:
        kinds_reference.save_adapter(name, folder / f"{name}.safetensors")
    config = ServeConfig(base=str(minilm), registry=str(folder), max_batch_size=len(ROWS), max_wait_ms=600_000,
                         split_overhead=10**9)
    with running(create_app(config)) as url:
        yield url


def test_rows_of_different_kinds_share_one_batch_and_equal_each_alone(kinds_server, kinds_reference, tokenizer):
    responses = asyncio.run(post_all(kinds_server, "/v1/classify", ROWS))
    for body, r in zip(ROWS, responses, strict=True):
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["batch_size"] == len(ROWS)  # LoRA, IA3 and Houlsby rows in one forward pass
        want = reference_scores(kinds_reference, tokenizer, body["adapter"], body["text"])
        assert_scores_close(got["scores"], want)
        # and it is that adapter's answer: every other adapter answers this text differently
        for other in KINDS.keys() - {body["adapter"]}:
            theirs = reference_scores(kinds_reference, tokenizer, other, body["text"])
            assert max(abs(theirs[k] - want[k]) for k in want) > 1e-3, (body["adapter"], other)
