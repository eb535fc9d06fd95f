"""Routing edge cases: name counts, routes of other models, weight updates inside a route block,
gradient checkpointing, float32 heads on half-precision bases, Trainer gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from tinymodels import ENCODER_DECODERS, tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel


def _model(model_type: str = "bert", seed: int = 0, **add) -> AdapterModel:
    model = AdapterModel(tiny_model(model_type, seed=seed))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=4), **add)
    model.add_adapter("b", AdapterConfig("parallel", bottleneck_size=6), **add)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("model_type", ["llama", "t5"])
def test_no_adapter_is_bit_identical_for_decoders_and_generate(model_type):
    base = tiny_model(model_type)
    inputs = tiny_inputs(model_type)
    gen_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = base(**inputs).logits.clone()
        tokens = base.generate(**gen_inputs, **kw)
    model = _model(model_type)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model(**inputs, adapter_names=[None] * 4).logits, logits)
    assert torch.equal(model.generate(**gen_inputs, **kw), tokens)
    assert torch.equal(model.generate(**gen_inputs, adapter_names=[None] * 4, **kw), tokens)
    if model_type not in ENCODER_DECODERS:
        assert not torch.equal(model.generate(**gen_inputs, adapter_names="a", max_new_tokens=4, do_sample=False,
                                              pad_token_id=0, output_scores=True, return_dict_in_generate=True).scores[0],
                               base.generate(**gen_inputs, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                             output_scores=True, return_dict_in_generate=True).scores[0])


def test_wrong_number_of_names_is_an_error_everywhere():
    model = _model("gpt2")
    inputs = tiny_inputs("gpt2")  # 4 rows
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 4 rows"):
        model.generate(**inputs, adapter_names=["a", "b"], max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 4 rows"):
        with model.route(["a", "b"]), torch.no_grad():
            model(**inputs)
    with pytest.raises(TypeError, match="adapter_names must be a name, a list of names"):
        model(**inputs, adapter_names=7)


def test_a_route_belongs_to_its_model():
    m1, m2 = _model("bert", seed=0), _model("bert", seed=1)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        plain = m2(**inputs).last_hidden_state
        with m1.route("a"):
            assert torch.equal(m2(**inputs).last_hidden_state, plain)  # m1's route does not touch m2
        with m1.route(["a", "b", None, "a"]), m2.route("b"):
            both = m1(**inputs).last_hidden_state, m2(**inputs).last_hidden_state
        assert torch.equal(both[0], m1(**inputs, adapter_names=["a", "b", None, "a"]).last_hidden_state)
        assert torch.equal(both[1], m2(**inputs, adapter_names="b").last_hidden_state)


def test_weight_updates_inside_a_route_block_are_seen():
    model = _model("bert")
    inputs = tiny_inputs("bert")
    names = ["a", "b", None, "b"]
    with model.route(names):
        with torch.no_grad():
            before = model(**inputs).last_hidden_state.clone()
            for p in model.adapters["b"].parameters():
                p.mul_(1.5)
            after = model(**inputs).last_hidden_state
        assert not torch.equal(before[1], after[1]) and torch.equal(before[0], after[0])
        # and under autograd: two forwards, two backwards, no stale graph
        for _ in range(2):
            model(**inputs).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in model.adapters["b"].parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_per_row_routing(reentrant):
    inputs = tiny_inputs("bert")
    names = ["a", "b", "a", None]
    grads = []
    for checkpointing in (False, True):
        model = _model("bert", head="classification", labels=["x", "y"])
        model.train()
        for p in model.adapters.parameters():
            p.requires_grad_(True)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            assert model.is_gradient_checkpointing
        names_heads = [n or "a" for n in names]
        torch.manual_seed(0)
        model.eval()  # no dropout: both runs must compute the same thing
        loss = model(**inputs, adapter_names=names_heads, labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.adapters.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    assert grads[1]["a.layers.0.attn.up.weight"].abs().sum() > 0


def test_float32_head_on_a_bf16_base():
    model = AdapterModel(tiny_model("bert", dtype=torch.bfloat16))
    model.add_adapter("a", AdapterConfig("houlsby"), head="classification", labels=["x", "y"], dtype=torch.float32)
    model.add_adapter("b", AdapterConfig("pfeiffer"), head="classification", labels=["p", "q", "r"])
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        single = model(**inputs, adapter_names="a").logits
        mixed = model(**inputs, adapter_names=["a", "b", "a", "b"]).logits
    assert single.dtype == torch.float32 and mixed.shape == (4, 3)
    assert (mixed[0, :2] - single[0]).abs().max() < 2e-2  # bf16 base: batched vs alone differ by rounding
    model.train_adapter("a")
    loss = model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    assert model.adapters["a"].head.out.weight.grad.dtype == torch.float32


def test_trainer_gradient_accumulation_matches_one_big_batch(tmp_path):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (16, 8), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": (ids[i, 1] > 50).long()}
            for i in range(16)]
    losses = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = AdapterModel(tiny_model("bert"))
        model.add_adapter("a", head="classification", labels=["x", "y"], head_dropout=0.0)
        model.train_adapter("a")
        args = TrainingArguments(output_dir=str(tmp_path / f"{batch}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, num_train_epochs=1, learning_rate=1e-3,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0)
        losses.append(Trainer(model=model, args=args, train_dataset=rows).train().training_loss)
    assert losses[1] == pytest.approx(losses[0], rel=0.05)  # not 2x: the loss is scaled once


def test_a_deep_copy_routes_by_itself():
    import copy

    model = _model("bert")
    inputs = tiny_inputs("bert")
    names = ["a", "b", None, "a"]
    with torch.no_grad():
        expected = model(**inputs, adapter_names=names).last_hidden_state
        plain = model(**inputs).last_hidden_state
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(**inputs, adapter_names=names).last_hidden_state, expected)
        assert torch.equal(clone(**inputs).last_hidden_state, plain)
        for p in clone.adapters["a"].parameters():
            p.mul_(2.0)
        changed = clone(**inputs, adapter_names=names).last_hidden_state
        assert not torch.equal(changed[0], expected[0]) and torch.equal(changed[1], expected[1])
        # the original is untouched, and still routes
        assert torch.equal(model(**inputs, adapter_names=names).last_hidden_state, expected)
    detached = copy.deepcopy(clone.detach())
    with torch.no_grad():
        assert torch.equal(detached(**inputs).last_hidden_state, plain)


def test_a_deep_copy_keeps_gradient_checkpointing_routed():
    import copy

    inputs = tiny_inputs("bert")
    names, labels = ["a", "b", "a", "b"], torch.tensor([0, 1, 1, 0])
    model = _model("bert", head="classification", labels=["x", "y"])
    model.gradient_checkpointing_enable({"use_reentrant": False})
    clone = copy.deepcopy(model)
    grads = []
    for m in (model, clone):
        m.eval()  # no dropout: both must compute the same thing
        for p in m.adapters.parameters():
            p.requires_grad_(True)
        m(**inputs, adapter_names=names, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in m.adapters.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(grads[1][n], g, atol=1e-6), n


def test_dropout_follows_train_and_eval_inside_one_route_block():
    model = AdapterModel(tiny_model("bert"))
    for name in ("a", "b"):
        model.add_adapter(name, AdapterConfig("houlsby", bottleneck_size=4, dropout=0.5))
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    inputs = tiny_inputs("bert")
    names = ["a", "b", "a", "b"]
    model.eval()
    with torch.no_grad():
        reference = model(**inputs, adapter_names=names).last_hidden_state
    with model.route(names), torch.no_grad():
        model.train()  # the route's first call is in training mode
        noisy = model(**inputs).last_hidden_state
        model.eval()  # ... and the later ones must not keep its dropout
        first, second = (model(**inputs).last_hidden_state for _ in range(2))
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert not torch.allclose(noisy, reference)
