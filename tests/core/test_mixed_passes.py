"""How a mixed batch runs a site where several module classes act (``Route._site_plans``): a class
covering most rows over the whole batch, the others on their own rows only (one adapter: its own
weights; several: a sub-route of those rows). Whatever the plan, every row equals that row alone
(max abs diff <= 1e-5), under no_grad, inference_mode and autograd (gradients too), in generate with
beams (rows repeated), and an input handed to the next module is never written in place.
"""

from __future__ import annotations

import pytest
import torch
from test_kinds_mixed import _build as build_kinds
from test_kinds_mixed import _row
from tinymodels import tiny_inputs
from torch import nn

from adapterkit import AdapterConfig, AdapterModel, kinds
from adapterkit.kinds.bottleneck import Bottleneck
from adapterkit.kinds.ia3 import IA3Site
from adapterkit.kinds.interface import AdapterKind, SiteModule
from adapterkit.kinds.lora import LoraSite

TOL = 1e-5
CONFIGS = {
    "l8a": AdapterConfig("lora", bottleneck_size=8, alpha=16, targets=["q", "k", "v"]),
    "l8b": AdapterConfig("lora", bottleneck_size=8, alpha=16, targets=["q", "k", "v"]),
    "l64": AdapterConfig("lora", bottleneck_size=64, targets=["q", "k", "v", "o", "up", "down"]),
    "ia3": AdapterConfig("ia3"),
    "hb": AdapterConfig("houlsby", bottleneck_size=6),
    "par": AdapterConfig("parallel", bottleneck_size=4),
}
# at "v": LoRA on 7 of 8 rows (whole batch), IA3 on one row (its rows alone)
DOMINANT = ["l8a", "l8b", "l8a", "l64", "l8b", "l8a", "l8b", "ia3"]
# at "v": LoRA on 4 rows of 2 adapters (each on its rows), IA3 on 2; bottlenecks on 2 rows
SPLIT = ["l8a", "ia3", "l8a", "ia3", "hb", "par", "l64", "l64"]
# at "v": LoRA on 3 rows of 3 adapters (one sub-route of those rows); a row without adapter
SUBROUTE = ["l8a", "l8b", "l64", "ia3", "hb", None, "par"]
# LoRA only: the hooks of the other kinds run and find nothing to do
LORA_ONLY = ["l8a", None, "l64", "l8b"]
ROW_SETS = [DOMINANT, SPLIT, SUBROUTE, LORA_ONLY]
IDS = ["dominant", "split", "subroute", "lora-only"]


def _build(model_type: str, seed: int = 0) -> AdapterModel:
    return build_kinds(model_type, seed, configs=CONFIGS)


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def _plans(model: AdapterModel, rows: list, layer: int, position: str) -> list[tuple]:
    """(rows, class, what runs) per pass at one site: "all", "one" (apply_single) or "sub"."""
    route = model._make_route(rows)
    shape = []
    for r, cls, plan in route._site_plans(layer, position):
        what = "all" if r is None else ("sub" if isinstance(plan, tuple) else "one")
        shape.append((r, cls, what))
    return shape


def test_the_plans_are_the_ones_meant():
    model = _build("bert")
    assert _plans(model, DOMINANT, 0, "v") == [(None, LoraSite, "all"), ((7,), IA3Site, "one")]
    assert _plans(model, SPLIT, 0, "v") == [((0, 2), LoraSite, "one"), ((6, 7), LoraSite, "one"),
                                            ((1, 3), IA3Site, "one")]
    assert _plans(model, SUBROUTE, 0, "v") == [((0, 1, 2), LoraSite, "sub"), ((3,), IA3Site, "one")]
    # houlsby (serial) and parallel: one class, one row each: a sub-route of both rows
    assert _plans(model, SUBROUTE, 0, "ffn") == [((4, 6), Bottleneck, "sub")]
    assert _plans(model, LORA_ONLY, 0, "ff") == [] and _plans(model, LORA_ONLY, 0, "ffn") == []
    # one class on every row: one pass over the whole batch, as before
    assert _plans(model, ["l8a", "l8b", "l64", "l8a"], 0, "q") == [(None, LoraSite, "all")]


@pytest.mark.parametrize("rows", ROW_SETS, ids=IDS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_each_row_equals_that_row_alone(model_type, mode, rows):
    model = _build(model_type)
    inputs = tiny_inputs(model_type, batch=len(rows))
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    with context():
        for _ in range(2):  # the second call reuses the route's cached plans and the model's stacks
            mixed = _out(model(**inputs, adapter_names=rows))
        for i, name in enumerate(rows):
            alone = _out(model(**_row(inputs, i), adapter_names=[name]))
            n = alone.shape[1]
            assert (mixed[i, :n] - alone[0]).abs().max().item() <= TOL, (model_type, i, name)
            if name is not None:  # and the adapter really acts on its row
                bare = _out(model(**_row(inputs, i), adapter_names=[None]))
                assert (mixed[i, :n] - bare[0]).abs().max().item() > 1e-3, (model_type, i, name)


@pytest.mark.parametrize("rows", ROW_SETS, ids=IDS)
def test_gradients_equal_those_of_rows_alone(rows):
    model = _build("llama", seed=1)
    inputs = tiny_inputs("llama", batch=len(rows))
    params = dict(model.adapters.named_parameters())
    with torch.enable_grad():
        model.zero_grad()
        mixed = _out(model(**inputs, adapter_names=rows))
        (mixed * inputs["attention_mask"][..., None].float()).sum().backward()
        from_mixed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        model.zero_grad()
        for i, name in enumerate(rows):
            _out(model(**_row(inputs, i), adapter_names=[name])).sum().backward()
        from_alone = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert set(from_mixed) == set(from_alone)
    assert {n.split(".")[0] for n in from_alone} == {n for n in rows if n is not None}
    for n in from_alone:
        torch.testing.assert_close(from_mixed[n], from_alone[n], atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("rows", ROW_SETS, ids=IDS)
def test_generate_with_beams_equals_each_row_alone(rows):
    """generate() repeats each row for its beams: a pass's rows are taken with their repeats."""
    model = _build("gpt2")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (len(rows), 6), generator=g)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        alone = model.generate(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]),
                               adapter_names=[name], **kw)
        new = alone.sequences[0, 6:]
        assert torch.equal(mixed.sequences[i, 6 : 6 + len(new)], new), (i, name)
        for step_mixed, step_alone in zip(mixed.scores, alone.scores):
            assert (step_mixed[i * 3 : (i + 1) * 3] - step_alone).abs().max() <= TOL, (i, name)


@pytest.mark.parametrize("rows", [SPLIT, SUBROUTE], ids=["split", "subroute"])
def test_an_input_of_the_next_module_is_not_written_in_place(rows):
    """IA3 on "ff" rewrites the input of the FFN's output projection: the FFN's inner activation, a
    tensor its own module returned, must keep its values (only a copy carries the scaled rows)."""
    model = _build("bert")
    seen = []
    hooks = [layer.intermediate.register_forward_hook(lambda m, a, out: seen.append((out, out.clone())))
             for layer in model.base.encoder.layer]
    try:
        with torch.inference_mode():
            model(**tiny_inputs("bert", batch=len(rows)), adapter_names=rows)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 2
    for out, copy in seen:
        assert torch.equal(out, copy)


class _InnerGain(SiteModule):
    """A second class acting on the FFN's inner activation beside IA3 (a gain, routing's contract
    alone): two classes at a position that acts on a module's input."""

    def __init__(self, hidden_size: int, config: AdapterConfig, feed: str = "output", dims=(0, 0), position="", **factory):
        super().__init__()
        self.feed = feed
        self.gain = nn.Parameter(torch.ones(dims[0], **factory))

    @property
    def params(self):
        return (self._parameters["gain"],)

    def apply_single(self, out, z):
        return out * self.gain.to(out.dtype)

    @classmethod
    def mixed_plan(cls, members, slots):
        live = [m for m in members if m is not None]
        return (members, live[0].gain.shape[0]) if live else None

    @classmethod
    def apply_mixed(cls, route, layer, position, plan, out, captured):
        members, d = plan
        (gain,) = route.gather(("inner_gain", layer, position), members, out.dtype, out.device,
                               lambda: (torch.ones(d, dtype=out.dtype, device=out.device),),
                               lambda m: (m.gain.to(out.dtype),))
        n = out.shape[0]
        return (out.reshape(n, -1, out.shape[-1]) * route.expand(gain, n)[:, None]).reshape(out.shape)


@pytest.mark.parametrize("rows", [["g1", "ia3", "g2", "g1", None, "l8a"], ["ia3", "g1", "ia3", "ia3", "g2", "hb"]],
                         ids=["gain-widest", "ia3-widest"])
def test_two_classes_on_an_input_position(monkeypatch, rows):
    monkeypatch.setitem(kinds.KINDS, "test_inner_gain",
                        AdapterKind("test_inner_gain", {"ff": "output"}, _InnerGain, sized_by_site=True))
    model = _build("bert")
    for name in ("g1", "g2"):
        model.add_adapter(name, AdapterConfig("test_inner_gain"))
        with torch.no_grad():
            model.adapters[name].layers[0].ff.gain.uniform_(0.5, 1.5)
            model.adapters[name].layers[1].ff.gain.uniform_(0.5, 1.5)
    plans = _plans(model, rows, 0, "ff")
    assert [p[2] for p in plans][0] == "all" and len(plans) >= 2  # the widest class makes the new tensor
    inputs = tiny_inputs("bert", batch=len(rows))
    seen = []
    hook = model.base.encoder.layer[0].intermediate.register_forward_hook(
        lambda m, a, out: seen.append((out, out.clone())))
    with torch.inference_mode():
        try:
            mixed = _out(model(**inputs, adapter_names=rows))
        finally:
            hook.remove()
        assert torch.equal(*seen[0])
        for i, name in enumerate(rows):
            alone = _out(model(**_row(inputs, i), adapter_names=[name]))
            assert (mixed[i, : alone.shape[1]] - alone[0]).abs().max().item() <= TOL, (i, name)
