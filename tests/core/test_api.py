"""Model API: configs, identity without adapters, add/delete/activate, freezing, reports, Trainer."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from tinymodels import tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="adapterfusion"), r"kind must be one of houlsby, pfeiffer, parallel(, \w+)*; got 'adapterfusion'"),
        (dict(activation="softmax"), "activation must be one of relu, gelu, silu, swish, tanh; got 'softmax'"),
        (dict(bottleneck_size=8, reduction_factor=4), "either bottleneck_size or reduction_factor, not both"),
        (dict(bottleneck_size=0), "bottleneck_size must be a positive integer; got 0"),
        (dict(bottleneck_size=2.5), "bottleneck_size must be a positive integer; got 2.5"),
        (dict(reduction_factor=-2), "reduction_factor must be a positive number; got -2"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\); got 1.0"),
        (dict(leave_out=[0, -1]), r"leave_out must be a list of layer indices >= 0; got \[0, -1\]"),
        (dict(scaling=0), "scaling must be a finite positive number; got 0"),
        (dict(init_std=-1e-2), "init_std must be a positive number"),
    ],
)
def test_invalid_config_is_rejected_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_config_defaults_and_sizes():
    c = AdapterConfig()
    assert (c.kind, c.reduction_factor, c.scaling, c.train_layer_norms) == ("houlsby", 16, 1.0, True)
    assert c.bottleneck_for(384) == 24 and c.sites == ("attn", "ffn")
    p = AdapterConfig("parallel", activation="swish")
    assert (p.activation, p.scaling, p.train_layer_norms, p.sites) == ("silu", 4.0, False, ("ffn",))
    assert AdapterConfig("pfeiffer", bottleneck_size=7).bottleneck_for(384) == 7
    assert AdapterConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown adapter config key"):
        AdapterConfig.from_dict({"kind": "houlsby", "size": 3})


def test_outputs_bit_identical_without_adapters_and_after_removal():
    base = tiny_model("bert")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        reference = base(**inputs).last_hidden_state.clone()
        model = AdapterModel(base)
        assert torch.equal(model(**inputs).last_hidden_state, reference)
        model.add_adapter("a", AdapterConfig("houlsby"))
        model.add_adapter("p", AdapterConfig("parallel"))
        assert torch.equal(model(**inputs).last_hidden_state, reference)  # added, not active
        assert torch.equal(model(**inputs, adapter_names=[None] * 4).last_hidden_state, reference)
        assert not torch.equal(model(**inputs, adapter_names="a").last_hidden_state, reference)
        model.delete_adapter("a")
        model.delete_adapter("p")
        assert torch.equal(model(**inputs).last_hidden_state, reference)
        bare = model.detach()
        assert bare is base and torch.equal(base(**inputs).last_hidden_state, reference)
        assert all("forward" not in m.__dict__ for m in base.modules())
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


def test_near_identity_init():
    base = tiny_model("bert")
    inputs = tiny_inputs("bert")
    model = AdapterModel(base)
    adapter = model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=4))
    for name, p in adapter.named_parameters():
        if name.endswith("bias") or name.endswith("shift"):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith("scale"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # truncated N(0, 1e-2): within two standard deviations
            assert p.abs().max() <= 2e-2 and p.std() > 1e-3, name
    with torch.no_grad():
        delta = model(**inputs, adapter_names="a").last_hidden_state - base(**inputs).last_hidden_state
    assert 0 < delta.abs().max() < 1e-2


def test_add_list_activate_delete_and_errors():
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("a", head="classification", labels=["x", "y"])
    model.add_adapter("b", AdapterConfig("pfeiffer"))
    assert model.list_adapters() == ["a", "b"]
    assert model.labels("a") == ["x", "y"]
    assert model.adapter_info("b")["config"]["kind"] == "pfeiffer"
    with pytest.raises(ValueError, match="an adapter named 'a' is already loaded"):
        model.add_adapter("a")
    for bad in ("", "../x", "a/b", " a", "a.b"):
        with pytest.raises(ValueError, match="adapter name"):
            model.add_adapter(bad)
    with pytest.raises(KeyError, match="unknown adapter 'zzz'; loaded adapters: a, b"):
        model.set_active_adapter("zzz")
    with pytest.raises(ValueError, match="needs its label names"):
        model.add_adapter("c", head="classification")
    with pytest.raises(ValueError, match=r"leave_out has layer indices \[5\], but this model has 2 layers"):
        model.add_adapter("c", AdapterConfig(leave_out=[5]))
    with pytest.raises(ValueError, match="unknown head 'regression'"):
        model.add_adapter("c", head="regression", labels=["v"])
    assert model.list_adapters() == ["a", "b"]  # failed adds leave nothing behind
    inputs = tiny_inputs("bert")
    model.set_active_adapter("b")
    assert model.active_adapter == "b"
    with torch.no_grad():
        by_default = model(**inputs).last_hidden_state
        by_name = model(**inputs, adapter_names="b").last_hidden_state
        assert torch.equal(by_default, by_name)
        with pytest.raises(ValueError, match="adapter_names has 3 entries for a batch of 4 rows"):
            model(**inputs, adapter_names=["a", "b", None])
    model.delete_adapter("b")
    assert model.active_adapter is None and model.list_adapters() == ["a"]
    with pytest.raises(KeyError, match="unknown adapter 'b'"):
        model.delete_adapter("b")


def test_train_adapter_unfreezes_exactly_that_adapter():
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=4), head="classification", labels=["x", "y", "z"])
    model.add_adapter("b", AdapterConfig("pfeiffer", bottleneck_size=4), head="classification", labels=["x", "y"])
    report = model.train_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("adapters.b.")}
    # pfeiffer: FFN bottleneck per layer (d*r + r + r*d + d), no norms; head dense d*d+d, out d*3... labels 2
    d, r, layers = 32, 4, 2
    expected = layers * (d * r + r + r * d + d) + (d * d + d) + (d * 2 + 2)
    assert report.trainable == expected
    assert report.base_total == sum(p.numel() for p in model.base.parameters())
    assert f"({report.percent:.2f} %)" in str(report)
    model.train_adapter("a")  # houlsby: norms train too
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".norms." in n for n in names) and all(n.startswith("adapters.a.") for n in names)
    houlsby_no_norms = AdapterModel(tiny_model("bert"))
    houlsby_no_norms.add_adapter("h", AdapterConfig("houlsby", train_layer_norms=False))
    houlsby_no_norms.train_adapter("h")
    assert not any(".norms." in n for n, p in houlsby_no_norms.named_parameters() if p.requires_grad)


def test_training_step_moves_only_the_adapter():
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("a", head="classification", labels=["x", "y"])
    model.train_adapter("a")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = tiny_inputs("bert")
    loss = model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("adapters.a.") for n in changed)
    assert any(".norms." in n for n in changed) and any("head" in n for n in changed)


def test_mixed_batch_trains_each_row_through_its_own_adapter():
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("a", head="classification", labels=["x", "y"])
    model.add_adapter("b", AdapterConfig("parallel"), head="classification", labels=["p", "q", "r"])
    for p in model.adapters.parameters():
        p.requires_grad_(True)
    out = model(**tiny_inputs("bert"), adapter_names=["a", "b", "a", "b"], labels=torch.tensor([1, 2, 0, 0]))
    out.loss.backward()
    for name in ("a", "b"):
        grads = [p.grad for n, p in model.adapters[name].named_parameters() if "up.weight" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_routing_is_thread_and_task_local():
    model = AdapterModel(tiny_model("bert"))
    for name, kind in (("a", "houlsby"), ("b", "parallel"), ("c", "pfeiffer")):
        model.add_adapter(name, AdapterConfig(kind, bottleneck_size=4))
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(0.3)
    model.set_active_adapter("b")  # the shared default: a parallel adapter, whose FFN input is captured
    inputs = tiny_inputs("bert")
    routes = [["a", "b", "c", None], "b", ["c", "c", "a", "a"], None]
    with torch.no_grad():
        expected = [model(**inputs, adapter_names=r).last_hidden_state for r in routes]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def worker(t: int) -> None:
        with torch.no_grad():
            for k in range(6):
                j = (t + k) % len(routes)
                with model.route(routes[j]):
                    results[(t, k)] = model(**inputs).last_hidden_state

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert len(results) == 24
    for (t, k), value in results.items():
        assert torch.equal(value, expected[(t + k) % len(routes)])

    async def task(j: int) -> torch.Tensor:
        with model.route(routes[j]):
            await asyncio.sleep(0)  # let the other tasks set their routes in between
            with torch.no_grad():
                return model(**inputs).last_hidden_state

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(task(j) for j in range(len(routes))))

    for value, exp in zip(asyncio.run(main()), expected):
        assert torch.equal(value, exp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    base = tiny_model("llama", dtype=dtype)
    model = AdapterModel(base)
    model.add_adapter("half", AdapterConfig("houlsby"))  # parameters in the base's dtype
    model.add_adapter("fp32", AdapterConfig("parallel"), dtype=torch.float32)  # full-precision training copy
    assert next(model.adapters["half"].parameters()).dtype == dtype
    assert next(model.adapters["fp32"].parameters()).dtype == torch.float32
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        for names in ("half", "fp32", ["half", "fp32", None, "half"]):
            logits = model(**inputs, adapter_names=names).logits
            assert logits.dtype == dtype and torch.isfinite(logits).all()
    model.train_adapter("fp32")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.adapters["fp32"].parameters())


def test_hf_trainer_trains_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("a", head="classification", labels=["x", "y"])
    model.train_adapter("a")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (32, 8), generator=g)
    labels = (ids[:, 1] > 50).long()  # learnable from the tokens
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]} for i in range(32)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-2,
        save_strategy="no", report_to=[], logging_steps=1, use_cpu=True,
    )
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("adapters.a.") for n in changed)
    assert result.global_step == 8 and result.training_loss > 0
