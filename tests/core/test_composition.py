"""Composition blocks per row (Stack, Average) and AdapterDrop.

References are independent of the routing code: hand-written hooks that apply each member's module
(its plain ``forward``, the delta) on the bare base model, and, for LoRA, the merged base weights.
Every per-row check compares a row of a batch with that row alone (max abs diff <= 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel, Average, Parallel, Stack
from adapterkit.composition import MAX_DEPTH, from_json

TOL = 1e-5


def _randomise(model: AdapterModel, seed: int = 0) -> AdapterModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from the identity (LoRA's B starts at zero), so mistakes show
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _bottleneck_model(model_type: str) -> AdapterModel:
    model = AdapterModel(tiny_model(model_type))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=6, train_layer_norms=True))
    model.add_adapter("b", AdapterConfig("pfeiffer", bottleneck_size=4, train_layer_norms=True))
    model.add_adapter("c", AdapterConfig("houlsby", bottleneck_size=3))
    return _randomise(model)


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def _reference(model: AdapterModel, inputs: dict, combine) -> torch.Tensor:
    """The bare base with hand-made hooks: at each bottleneck site and norm, ``combine(fns, out)`` with
    one function per member (that member's serial bottleneck or norm affine; identity where absent)."""
    names = combine.names
    adapters = [model.adapters[n] for n in names]
    handles = []

    def site_fn(module):
        return (lambda out: out) if module is None else (lambda out: out + module(out))

    def norm_fn(affine):
        return (lambda out: out) if affine is None else (lambda out: out * affine.scale + affine.shift)

    for ls in model.layer_sites:
        for position, role in (("attn", "attn_out"), ("ffn", "ffn_out")):
            fns = [site_fn(a.site(ls.index, position)) for a in adapters]
            handles.append(getattr(ls, role).register_forward_hook(lambda m, args, out, fns=fns: combine(fns, out)))
        for j, (_, norm) in enumerate(ls.norms):
            fns = [norm_fn(a.norm(ls.index, j)) for a in adapters]
            handles.append(norm.register_forward_hook(lambda m, args, out, fns=fns: combine(fns, out)))
    try:
        return _out(model(**inputs, adapter_names=[None] * inputs["input_ids"].shape[0]))
    finally:
        for h in handles:
            h.remove()


def _stacked(*names):
    def combine(fns, out):
        for f in fns:
            out = f(out)
        return out

    combine.names = names
    return combine


def _averaged(names, weights):
    def combine(fns, out):
        return sum(w * f(out) for w, f in zip(weights, fns))

    combine.names = names
    return combine


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("grad", [False, True])
def test_stack_and_average_match_hand_made_hooks(model_type, grad):
    model = _bottleneck_model(model_type)
    inputs = tiny_inputs(model_type, batch=3)
    with torch.set_grad_enabled(grad):
        cases = [
            (Stack("a", "b"), _stacked("a", "b")),
            (Stack("b", "a", "c"), _stacked("b", "a", "c")),
            (Average("a", "b", weights=[3, 1]), _averaged(("a", "b"), [0.75, 0.25])),
            (Average("a", "c", weights=[0.5, 2.0], normalize=False), _averaged(("a", "c"), [0.5, 2.0])),
        ]
        for block, combine in cases:
            ours = _out(model(**inputs, adapter_names=block))
            ref = _reference(model, inputs, combine)
            assert (ours - ref).abs().max().item() <= TOL, (block, (ours - ref).abs().max().item())
            alone = _out(model(**inputs, adapter_names="a"))
            assert (ours - alone).abs().max().item() > 1e-3  # the composition is not just one member


def _lora_model(model_type: str) -> AdapterModel:
    model = AdapterModel(tiny_model(model_type))
    model.add_adapter("la", AdapterConfig("lora", bottleneck_size=4, targets=["q", "v", "o", "down"]))
    model.add_adapter("lb", AdapterConfig("lora", bottleneck_size=8, targets=["k", "v", "o", "up"]))
    model.add_adapter("h", AdapterConfig("houlsby", bottleneck_size=6))
    model.add_adapter("i", AdapterConfig("ia3"))
    return _randomise(model)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("top", ["lb", "h", "i"])
def test_stack_over_a_lora_equals_the_merged_lora(model_type, top):
    """Stack("la", top) == ``la`` folded into the base weights, then ``top`` alone. For a bottleneck on
    top either order gives the same: a projection's own change (LoRA) applies before a bottleneck on
    that projection's output; IA3 scaling the FFN's activation scales what LoRA on ``down`` reads."""
    model = _lora_model(model_type)
    inputs = tiny_inputs(model_type, batch=3)
    with torch.no_grad():
        stacked = _out(model(**inputs, adapter_names=Stack("la", top)))
        reverse = _out(model(**inputs, adapter_names=Stack(top, "la")))
        model.merge_adapter("la")
        merged_weights = {k: v.clone() for k, v in model.base.state_dict().items()}
        merged_logits = model.base(**inputs).logits  # la alone, by its merged weights
        model.unmerge_adapter("la")
        # a fresh model on the merged weights, carrying a copy of ``top``
        reference = AdapterModel(tiny_model(model_type))
        reference.base.load_state_dict(merged_weights)
        reference.add_adapter(top, model.adapters[top].config)
        reference.adapters[top].load_state_dict(model.adapters[top].state_dict())
        ref = _out(reference.eval()(**inputs, adapter_names=top))
    assert (stacked - ref).abs().max().item() <= TOL
    if top == "i":  # at one projection (v), members act in Stack order: IA3 then LoRA is another function
        assert (reverse - ref).abs().max().item() > 1e-3
    else:
        assert (reverse - ref).abs().max().item() <= TOL
    assert (stacked - merged_logits).abs().max().item() > 1e-3


ROWS = [
    Stack("a", "b"),
    "c",
    Average("a", "c", weights=[0.3, 0.7]),
    None,
    Stack("c", Average("a", "b")),
    Stack("b", "a"),
    "a",
]


def _row(inputs: dict, i: int) -> dict:
    row = {k: v[i : i + 1] for k, v in inputs.items()}
    if "attention_mask" in row:
        n = int(row["attention_mask"].sum())
        row = {k: (v[:, :n] if k in ("input_ids", "attention_mask") else v) for k, v in row.items()}
    return row


def _mixed_model(model_type: str) -> AdapterModel:
    model = AdapterModel(tiny_model(model_type))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=6, train_layer_norms=True))
    model.add_adapter("b", AdapterConfig("lora", bottleneck_size=4, targets=["q", "v", "down"]))
    model.add_adapter("c", AdapterConfig("ia3"))
    return _randomise(model)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "t5", "bart"])
@pytest.mark.parametrize("grad", [False, True])
def test_compositions_per_row_equal_each_row_alone(model_type, grad):
    model = _mixed_model(model_type)
    inputs = tiny_inputs(model_type, batch=len(ROWS))
    with torch.set_grad_enabled(grad):
        mixed = _out(model(**inputs, adapter_names=ROWS))
        for i, entry in enumerate(ROWS):
            alone = _out(model(**_row(inputs, i), adapter_names=[entry]))
            n = alone.shape[1]
            diff = (mixed[i, :n] - alone[0]).abs().max().item()
            assert diff <= TOL, (model_type, i, entry, diff)
        bare = _out(model.base(**_row(inputs, 3)))
        assert (mixed[3, : bare.shape[1]] - bare[0]).abs().max().item() <= TOL
        stacked = _out(model(**_row(inputs, 0), adapter_names=["a"]))
        assert (mixed[0, : stacked.shape[1]] - stacked[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 3])
def test_compositions_per_row_in_generate(model_type, beams):
    model = _mixed_model(model_type)
    rows = [Stack("a", "b"), Average("a", "c"), "b", None]
    prompts = tiny_inputs(model_type, batch=len(rows), seq=5)
    prompts["attention_mask"] = torch.ones_like(prompts["input_ids"])  # equal lengths: no padding side
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    together = model.generate(**prompts, adapter_names=rows, **kwargs)
    outputs = set()
    for i, entry in enumerate(rows):
        alone = model.generate(**_row(prompts, i), adapter_names=[entry], **kwargs)
        n = alone.shape[1]  # a row alone may stop sooner (end of sequence): the batch pads it
        assert torch.equal(together[i, :n], alone[0]), (i, entry)
        eos = model.base.generation_config.eos_token_id
        assert set(together[i, n:].tolist()) <= {0, *([eos] if isinstance(eos, int) else eos or [])}
        outputs.add(tuple(alone[0].tolist()))
    assert len(outputs) > 1  # the rows' compositions really differ


def test_a_stack_answers_with_its_last_members_head():
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("domain", AdapterConfig("houlsby", bottleneck_size=4), head=None)
    model.add_adapter("ner", AdapterConfig("houlsby", bottleneck_size=4), head="token_classification", labels=list("abc"))
    model.add_adapter("pos", AdapterConfig("pfeiffer", bottleneck_size=4), head="token_classification", labels=list("xy"))
    _randomise(model)
    inputs = tiny_inputs("bert", batch=3)
    rows = [Stack("domain", "ner"), "pos", Stack("domain", "pos")]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=rows).logits
        assert mixed.shape[-1] == 3
        for i, entry in enumerate(rows):
            alone = model(**_row(inputs, i), adapter_names=[entry]).logits
            width = alone.shape[-1]
            assert width == (3 if i == 0 else 2)
            assert (mixed[i, : alone.shape[1], :width] - alone[0]).abs().max().item() <= TOL
            assert torch.isinf(mixed[i, :, width:]).all()
        with pytest.raises(ValueError, match="mixes rows whose tasks have a head"):
            model(**inputs, adapter_names=[Stack("ner", "domain"), "pos", "ner"])


def test_training_a_task_adapter_stacked_on_a_frozen_domain_adapter():
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("domain", AdapterConfig("houlsby", bottleneck_size=4))
    model.add_adapter("task", AdapterConfig("houlsby", bottleneck_size=4), head="classification", labels=["n", "y"])
    _randomise(model)
    model.train_adapter("task")
    model.set_active_adapter(Stack("domain", "task"))
    assert model.active_adapter == Stack("domain", "task")
    model.train()
    inputs = tiny_inputs("bert", batch=4)
    labels = torch.tensor([0, 1, 1, 0])
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    domain_before = [p.detach().clone() for p in model.adapters["domain"].parameters()]
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.adapters["domain"].parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters["task"].parameters())
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(domain_before, model.adapters["domain"].parameters()))
    model.eval()
    with torch.no_grad():  # the active stack is what a plain call runs
        active = model(**inputs).logits
        named = model(**inputs, adapter_names=Stack("domain", "task")).logits
        task_only = model(**inputs, adapter_names="task").logits
    assert torch.equal(active, named)
    assert (active - task_only).abs().max() > 1e-4


@pytest.mark.parametrize("bad, error, match", [
    (Stack("a"), ValueError, "at least two members"),
    (Stack("a", Parallel("b", "c")), ValueError, "Parallel cannot be nested"),
    (Parallel("a", Parallel("b", "c")), ValueError, "cannot be one row"),
    (Stack("a", "nope"), KeyError, "unknown adapter 'nope'"),
    (Stack("a", 3), TypeError, "adapter names or blocks"),
])
def test_invalid_compositions_fail_clearly(bad, error, match):
    model = _bottleneck_model("bert")
    inputs = tiny_inputs("bert", batch=2)
    with pytest.raises(error, match=match):
        model(**inputs, adapter_names=bad)
    if not isinstance(bad, Parallel):
        with pytest.raises(error, match=match):
            model(**inputs, adapter_names=[bad, "a"])


def test_composition_bounds_and_weights():
    deep = "a"
    for _ in range(MAX_DEPTH + 1):
        deep = Stack(deep, "b")
    model = _bottleneck_model("bert")
    with pytest.raises(ValueError, match="nest at most"):
        model(**tiny_inputs("bert", batch=1), adapter_names=[deep])
    with pytest.raises(ValueError, match="2 members but 1 weights"):
        Average("a", "b", weights=[1])
    with pytest.raises(ValueError, match="finite"):
        Average("a", "b", weights=[1, float("nan")])
    with pytest.raises(ValueError, match="positive sum"):
        Average("a", "b", weights=[1, -1])
    assert Average("a", "b").weights == (0.5, 0.5)
    with pytest.raises(ValueError, match="Parallel"):
        model.generate(**tiny_inputs("bert", batch=1), adapter_names=Parallel("a", "b"))


def test_json_form_round_trips_and_rejects_malformed():
    block = Stack("lang", Average("t1", "t2", weights=[1, 3]))
    assert from_json(block.to_json()) == block
    assert from_json({"stack": ["a", "b"]}) == Stack("a", "b")
    assert from_json("a") == "a" and from_json(None) is None
    for bad in [{"stack": "ab"}, {"stack": ["a"], "average": ["b"]}, {"stack": ["a", None]}, {"mix": ["a"]},
                {"stack": ["a"], "weights": [1]}, {"average": ["a", "b"], "weights": "x"}, 3,
                {"stack": ["a"] * 100}]:
        with pytest.raises(ValueError):
            from_json(bad)
    nested: object = "a"
    for _ in range(50):  # hostile depth: refused, never a RecursionError
        nested = {"stack": [nested, "b"]}
    with pytest.raises(ValueError, match="nest at most"):
        from_json(nested)


# -- AdapterDrop -------------------------------------------------------------------------------


def test_adapter_drop_equals_leaving_the_lower_layers_out_and_stops_the_backward():
    base = tiny_model("bert")
    model = AdapterModel(base)
    n = model.num_layers
    k = n // 2
    model.add_adapter("full", AdapterConfig("houlsby", bottleneck_size=4, train_layer_norms=True),
                      head="classification", labels=["n", "y"])
    model.add_adapter("upper", AdapterConfig("houlsby", bottleneck_size=4, train_layer_norms=True,
                                             leave_out=list(range(k))), head="classification", labels=["n", "y"])
    _randomise(model)
    upper = model.adapters["upper"].state_dict()
    model.adapters["upper"].load_state_dict({key: v for key, v in model.adapters["full"].state_dict().items() if key in upper})
    inputs = tiny_inputs("bert", batch=3)
    with torch.no_grad(), model.route("full", drop_below=k):
        dropped = model(**inputs).logits
    with torch.no_grad():
        left_out = model(**inputs, adapter_names="upper").logits
        full = model(**inputs, adapter_names="full").logits
    assert (dropped - left_out).abs().max().item() <= TOL
    assert (dropped - full).abs().max().item() > 1e-4

    # the backward: no graph below layer k
    model.train_adapter("full")
    outputs = {}
    layers = [ls.layer for ls in model.layer_sites] if hasattr(model.layer_sites[0], "layer") else None
    modules = layers or [model.layer_sites[i].attn_out for i in range(n)]
    handles = [m.register_forward_hook(lambda mod, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
               for i, m in enumerate(modules)]
    try:
        with model.route("full", drop_below=k):
            loss = model(**inputs, labels=torch.tensor([0, 1, 0])).loss
    finally:
        for h in handles:
            h.remove()
    assert all(not outputs[i].requires_grad for i in range(k - 1))
    assert outputs[k].requires_grad
    loss.backward()
    for (layer, _), m in model.adapters["full"]._lookup().items():
        grads = [p.grad for p in m.parameters()]
        if layer < k:
            assert all(g is None for g in grads), layer
        else:
            assert any(g is not None for g in grads), layer
    with pytest.raises(ValueError, match="drop_below"):
        with model.route("full", drop_below=n + 1):
            pass


# -- Parallel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("lower", ["shared", "adapted"])
def test_parallel_equals_one_pass_per_member(model_type, lower):
    """``Parallel`` gives each member's output as its own pass would; with every member leaving the
    lower layers out, those layers run once (counted by a hook on the lowest layer)."""
    model = AdapterModel(tiny_model(model_type))
    n = model.num_layers
    leave = list(range(n // 2)) if lower == "shared" else []
    for i, kind in enumerate(["houlsby", "lora", "pfeiffer"]):
        model.add_adapter(f"t{i}", AdapterConfig(kind, bottleneck_size=4, leave_out=leave))
    model.add_adapter("upper", AdapterConfig("ia3", leave_out=list(range(n - 1))))
    _randomise(model)
    inputs = tiny_inputs(model_type, batch=3)
    members = ["t0", "t1", Stack("t2", "upper"), None]
    block = Parallel(*members)
    first = model.base.get_submodule(model.layer_sites[0].path)
    seen = []
    handle = first.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).shape[0]))
    try:
        with torch.no_grad():
            together = _out(model(**inputs, adapter_names=block))
    finally:
        handle.remove()
    assert together.shape[0] == 3 * len(members)
    assert seen == ([3] if lower == "shared" else [12])  # the lowest layer ran on B rows, or on N·B
    with torch.no_grad():
        for k, member in enumerate(members):
            alone = _out(model(**inputs, adapter_names=[member] * 3))
            diff = (together[3 * k : 3 * k + 3] - alone).abs().max().item()
            assert diff <= TOL, (member, diff)
    assert (together[:3] - together[3:6]).abs().max() > 1e-3


def test_parallel_heads_and_loss():
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=4, leave_out=[0]), head="classification", labels=["x", "y"])
    model.add_adapter("b", AdapterConfig("houlsby", bottleneck_size=4, leave_out=[0]), head="classification", labels=["x", "y", "z"])
    _randomise(model)
    inputs = tiny_inputs("bert", batch=2)
    labels = torch.tensor([1, 0])
    out = model(**inputs, adapter_names=Parallel("a", "b"), labels=labels)
    a = model(**inputs, adapter_names="a", labels=labels)
    b = model(**inputs, adapter_names="b", labels=labels)
    assert (out.logits[:2, :2] - a.logits).abs().max() <= TOL
    assert (out.logits[2:] - b.logits).abs().max() <= TOL
    assert abs(out.loss.item() - (a.loss.item() + b.loss.item()) / 2) <= 1e-5
    with pytest.raises(ValueError, match="at least two members"):
        model(**inputs, adapter_names=Parallel("a"))
    with pytest.raises(ValueError, match="encoder-decoder"):
        t5 = AdapterModel(tiny_model("t5"))
        t5.add_adapter("a")
        t5.add_adapter("b")
        t5(**tiny_inputs("t5", batch=1), adapter_names=Parallel("a", "b"))


# -- weight-space averaging ------------------------------------------------------------------------


def test_average_adapter_averages_every_parameter_and_refuses_mismatches():
    model = AdapterModel(tiny_model("bert"))
    config = AdapterConfig("lora", bottleneck_size=4)
    for name in ("a", "b"):
        model.add_adapter(name, config, head="classification", labels=["x", "y"])
    model.add_adapter("other", AdapterConfig("lora", bottleneck_size=8), head="classification", labels=["x", "y"])
    model.add_adapter("labels", config, head="classification", labels=["p", "q"])
    _randomise(model)
    merged = model.average_adapter("ab", ["a", "b"], weights=[1, 3])
    a, b = model.adapters["a"].state_dict(), model.adapters["b"].state_dict()
    for key, value in merged.state_dict().items():
        assert torch.allclose(value, 0.25 * a[key] + 0.75 * b[key], atol=1e-7), key
    assert model.labels("ab") == ["x", "y"]
    # LoRA's delta is linear in B for a fixed A: with a's A copied into b, the averaged adapter's
    # delta is the average of the deltas, and its hidden states those of routing Average(a, b)
    with torch.no_grad():
        for key, module in model.adapters["b"]._lookup().items():
            if hasattr(module, "A"):
                module.A.copy_(model.adapters["a"]._lookup()[key].A)
    model.delete_adapter("ab")
    model.average_adapter("ab", ["a", "b"], weights=[1, 3])
    inputs = tiny_inputs("bert", batch=2)
    with torch.no_grad():
        weight_space = model(**inputs, adapter_names="ab").last_hidden_state
        output_space = model(**inputs, adapter_names=Average("a", "b", weights=[1, 3])).last_hidden_state
        only_b = model(**inputs, adapter_names="b").last_hidden_state
    assert (weight_space - output_space).abs().max().item() <= TOL
    assert (weight_space - only_b).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="configs differ"):
        model.average_adapter("x1", ["a", "other"])
    with pytest.raises(ValueError, match="tasks differ"):
        model.average_adapter("x2", ["a", "labels"])
    with pytest.raises(KeyError, match="unknown adapter"):
        model.average_adapter("x3", ["a", "nope"])
    with pytest.raises(ValueError, match="already"):
        model.average_adapter("a", ["a", "b"])
    assert "x1" not in model.adapters and "x2" not in model.adapters
