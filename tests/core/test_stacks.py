"""The model's weight stacks for mixed batches (bank.StackStore) stay correct across calls: weights
changed in place or swapped, adapters deleted and re-added, capacity growth, mixed widths, inference
mode next to no_grad, dtype changes, and threads sharing one model."""

from __future__ import annotations

import threading

import torch
from tinymodels import tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel


def _perturb(model: AdapterModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


def _model(names: list[str], widths: dict[str, int] | None = None) -> AdapterModel:
    model = AdapterModel(tiny_model("bert"))
    for k, name in enumerate(names):
        model.add_adapter(name, AdapterConfig("houlsby", bottleneck_size=(widths or {}).get(name, 4)))
        _perturb(model, name, k)
    return model


def _assert_rows_match_alone(model: AdapterModel, inputs: dict, names: list[str | None], atol: float = 1e-5,
                             rtol: float = 0.0) -> None:
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).last_hidden_state
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            alone = model(**row, adapter_names=[name]).last_hidden_state[0]
            torch.testing.assert_close(mixed[i], alone, atol=atol, rtol=rtol)


def test_in_place_and_swapped_weights_are_seen_on_the_next_call():
    model = _model(["a", "b", "c"])
    inputs = tiny_inputs("bert")
    names = ["a", "b", None, "c"]
    _assert_rows_match_alone(model, inputs, names)
    with torch.no_grad():
        before = model(**inputs, adapter_names=names).last_hidden_state.clone()
        model.adapters["b"].layers[0].attn.up.weight.mul_(3.0)  # in place: bumps _version
        model.adapters["c"].layers[1].norms[0].shift.data = torch.full_like(model.adapters["c"].layers[1].norms[0].shift, 0.5)
        after = model(**inputs, adapter_names=names).last_hidden_state
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1]) and not torch.equal(before[3], after[3])
    _assert_rows_match_alone(model, inputs, names)


def test_deleted_adapters_free_their_slots_and_re_added_names_are_fresh():
    names = [f"t{k}" for k in range(4)]
    model = _model(names)
    inputs = tiny_inputs("bert")
    _assert_rows_match_alone(model, inputs, names)
    capacity = {key: stack.tensors[0].shape[0] for key, stack in model._stacks._stacks.items()}
    for round_ in range(6):  # churn, as a serving cache does: the stacks must not grow
        model.delete_adapter("t1")
        model.add_adapter("t1", AdapterConfig("houlsby", bottleneck_size=4))
        _perturb(model, "t1", 100 + round_)
        _assert_rows_match_alone(model, inputs, names)
    assert {key: stack.tensors[0].shape[0] for key, stack in model._stacks._stacks.items()} == capacity


def test_growth_and_mixed_widths_in_one_batch():
    names = [f"t{k}" for k in range(11)]
    model = _model(names, widths={"t3": 7, "t8": 2})
    inputs = tiny_inputs("bert", batch=12, seq=7)
    _assert_rows_match_alone(model, inputs, [*names, None])
    _assert_rows_match_alone(model, inputs, list(reversed([*names, None])))


def test_inference_mode_next_to_no_grad_and_a_dtype_change():
    model = _model(["a", "b"])
    inputs = tiny_inputs("bert")
    names = ["b", "a", "a", None]
    with torch.inference_mode():
        first = model(**inputs, adapter_names=names).last_hidden_state.clone()
    with torch.no_grad():
        second = model(**inputs, adapter_names=names).last_hidden_state
        _perturb(model, "a", 7)  # outside inference mode, after stacks were filled inside it
    assert torch.equal(first, second)
    with torch.inference_mode():
        third = model(**inputs, adapter_names=names).last_hidden_state
    assert torch.equal(third[0], first[0]) and not torch.equal(third[1], first[1])
    model.to(torch.bfloat16)
    _assert_rows_match_alone(model, inputs, names, atol=2e-2, rtol=2e-2)  # a few bf16 ulps


def test_threads_sharing_one_model_get_their_own_rows():
    names = [f"t{k}" for k in range(6)]
    model = _model(names)
    inputs = tiny_inputs("bert")
    routes = [[names[(i + j) % 6] for i in range(4)] for j in range(6)]
    with torch.no_grad():
        expected = [model(**inputs, adapter_names=r).last_hidden_state for r in routes]
    model._stacks = type(model._stacks)()  # start empty: threads fill it concurrently
    errors: list[str] = []

    def work(j: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                got = model(**inputs, adapter_names=routes[j]).last_hidden_state
                if not torch.allclose(got, expected[j], atol=1e-6):
                    errors.append(f"route {j}: max diff {(got - expected[j]).abs().max().item()}")

    threads = [threading.Thread(target=work, args=(j,)) for j in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
