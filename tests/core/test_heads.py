"""Per-task heads on the HF model classes users load: sequence/pair/token classification and the
base model's own heads."""

from __future__ import annotations

import torch
from tinymodels import TINY, tiny_inputs
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

from adapterkit import AdapterConfig, AdapterModel


def _hf(auto, **extra):
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", **TINY["bert"][0], **extra)
    return auto.from_config(config).eval()


def test_token_classification_heads_mixed_rows():
    model = AdapterModel(_hf(AutoModelForTokenClassification, num_labels=3))
    model.add_adapter("pos", AdapterConfig("houlsby"), head="token_classification", labels=["N", "V", "A", "D"])
    model.add_adapter("ner", AdapterConfig("pfeiffer"), head="token_classification", labels=["O", "PER"])
    inputs = tiny_inputs("bert")
    names = ["pos", "ner", "ner", "pos"]
    labels = torch.full((4, 9), -100)
    labels[:, :3] = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = model(**inputs, adapter_names=names, labels=labels)
        assert out.logits.shape == (4, 9, 4)
        assert torch.isinf(out.logits[1, :, 2:]).all() and torch.isfinite(out.logits[0]).all()
        for i, name in enumerate(names):
            alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapter_names=name)
            n = len(model.labels(name))
            assert (out.logits[i, :, :n] - alone.logits[0]).abs().max() <= 1e-5
    assert torch.isfinite(out.loss) and out.loss > 0


def test_pair_classification_uses_token_type_ids():
    model = AdapterModel(_hf(AutoModelForSequenceClassification, num_labels=2))
    model.add_adapter("nli", head="pair_classification", labels=["entail", "neutral", "contradict"])
    inputs = tiny_inputs("bert")
    segments = torch.zeros_like(inputs["input_ids"])
    segments[:, 4:] = 1
    with torch.no_grad():
        with_pairs = model(**inputs, token_type_ids=segments, adapter_names="nli").logits
        single = model(**inputs, adapter_names="nli").logits
    assert with_pairs.shape == (4, 3) and not torch.allclose(with_pairs, single)
    assert model.adapter_info("nli")["task"] == {"type": "pair_classification", "labels": ["entail", "neutral", "contradict"]}


def test_base_models_own_head_when_the_task_has_none():
    base = _hf(AutoModelForSequenceClassification, num_labels=2)
    model = AdapterModel(base)
    model.add_adapter("plain", AdapterConfig("houlsby"))  # no head of its own: HF's classifier answers
    inputs = tiny_inputs("bert")
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        reference = base(**inputs, labels=labels)
        out = model(**inputs, labels=labels, adapter_names=None)
        assert torch.equal(out.logits, reference.logits) and torch.equal(out.loss, reference.loss)
        routed = model(**inputs, adapter_names="plain")
        assert routed.logits.shape == (4, 2) and not torch.equal(routed.logits, reference.logits)
    assert model.adapter_info("plain")["task"]["type"] == "none"


def test_causal_lm_tasks_share_the_lm_head():
    from tinymodels import tiny_model

    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("style", AdapterConfig("houlsby"))
    assert model.adapter_info("style")["task"] == {"type": "lm", "labels": []}
    report = model.train_adapter("style")
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    assert report.trainable == sum(p.numel() for p in model.adapters["style"].parameters())
