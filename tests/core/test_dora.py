"""DoRA (LoRA with ``dora=True``): identity at init, exact maths at a projection against the formula,
mixed batches, artifacts, gradients and errors (merging: test_lora_ia3.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tinymodels import FUSED_ROWS, tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel

ALL = ["q", "k", "v", "o", "up", "down"]
TOL = 1e-5


def _dora(**kw) -> AdapterConfig:
    return AdapterConfig("lora", dora=True, **{"bottleneck_size": 3, "alpha": 6, "targets": ALL, **kw})


def _perturb(model: AdapterModel, seed: int = 0) -> None:
    """Random A, B and a magnitude away from ||W|| (every factor of the maths matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            if name.endswith("magnitude"):
                p.mul_(1 + torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _hidden(model: AdapterModel, inputs: dict, names) -> torch.Tensor:
    out = model(**inputs, adapter_names=names)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _weight(ls, role: str, model_type: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (out, in) weight and bias of a role's projection (its rows of a fused one: ``FUSED_ROWS``)."""
    module = getattr(ls, role)
    w = module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()
    b = getattr(module, "bias", None)
    rows = FUSED_ROWS.get(model_type, {}).get(role)
    if rows is not None:
        w, b = w[rows], None if b is None else b[rows]
    return w.detach(), None if b is None else b.detach()


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "bloom", "phi3"])
def test_a_new_dora_adapter_is_exactly_the_identity(model_type):
    """m starts at ||W||, B at zero: g = 1 exactly, outputs bit-identical to the base's, alone and mixed."""
    model = AdapterModel(tiny_model(model_type)).eval()
    site = model.add_adapter("d", _dora()).layers[0].v
    ls = model.layer_sites[0]
    w = ls.attn_v.weight if isinstance(ls.attn_v, torch.nn.Linear) else ls.attn_v.weight.t()  # (out, in)
    rows = FUSED_ROWS.get(model_type, {}).get("attn_v", slice(None))  # each row's norm over the weight as it lies
    assert torch.equal(site.magnitude, torch.linalg.vector_norm(w.detach(), dim=1)[rows])
    model.add_adapter("l", AdapterConfig("lora", targets=ALL))
    inputs = tiny_inputs(model_type)
    with torch.no_grad():
        base = _hidden(model, inputs, None)
        assert torch.equal(_hidden(model, inputs, "d"), base)
        assert torch.equal(_hidden(model, inputs, ["d", "l", None, "d"]), base)
    with torch.enable_grad():
        assert torch.equal(_hidden(model, inputs, "d"), base)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "bloom", "falcon", "codegen", "phi3"])
def test_dora_maths_at_a_projection(model_type):
    """The hooked projection's output is W' x + b with W' = m (W + s B A) / ||W + s B A|| (rows),
    computed here in float64 from the base weights: a plain Linear (bert, llama's grouped-query v),
    GPT-2's fused Conv1D c_attn (q its first third, v its last) and fused projections whose q, k, v
    rows interleave per head (bloom, falcon, codegen) or have grouped-query widths (phi3)."""
    base = tiny_model(model_type)
    model = AdapterModel(base)
    dora = model.add_adapter("d", _dora())
    model.add_adapter("h", AdapterConfig("houlsby", bottleneck_size=4))
    _perturb(model)
    model.eval()
    ls = model.layer_sites[1]
    inputs = tiny_inputs(model_type)
    for role, position in (("attn_q", "q"), ("attn_v", "v")):
        target = getattr(ls, role)
        seen: dict[str, torch.Tensor] = {}
        handles = [target.register_forward_hook(lambda m, a, out, seen=seen: seen.__setitem__("out", out.clone())),
                   target.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__("in", a[0].clone()))]
        site = getattr(dora.layers[1], position)
        w, b = (t.double() if t is not None else None for t in _weight(ls, role, model_type))
        merged = w + site.scale * (site.B.detach().double() @ site.A.detach().double())
        w_new = site.magnitude.detach().double()[:, None] * merged / merged.norm(dim=1, keepdim=True)
        part = FUSED_ROWS.get(model_type, {}).get(role, slice(None))
        with torch.no_grad():
            base(**inputs)
            plain = seen["out"]
            for names in ("d", ["d", None, "d", "h"]):
                model(**inputs, adapter_names=names)
                x, got = seen["in"].double(), seen["out"]
                expected = x @ w_new.T + (0 if b is None else b)
                rows = slice(None) if names == "d" else slice(0, None, 2)
                torch.testing.assert_close(got[rows][..., part].double(), expected[rows], atol=TOL, rtol=0)
                if names != "d":  # no DoRA on rows 1 (none) and 3 (houlsby acts after attention): untouched
                    assert torch.equal(got[1], plain[1])
                    untouched = x[3] @ w.T + (0 if b is None else b)  # houlsby changed row 3's input, not W
                    torch.testing.assert_close(got[3][..., part].double(), untouched, atol=TOL, rtol=0)
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("grad", [False, True])
def test_mixed_rows_equal_each_alone(model_type, grad):
    """Rows of DoRA, plain LoRA, Houlsby and none in one batch give what each gives alone, whichever way
    the planner runs the site (whole-batch gathered pass, a sub-route, one adapter on its rows)."""
    model = AdapterModel(tiny_model(model_type))
    model.add_adapter("d", _dora())
    model.add_adapter("d2", _dora(bottleneck_size=5, alpha=2, targets=["q", "v", "up"]))
    model.add_adapter("l", AdapterConfig("lora", bottleneck_size=2, targets=ALL))
    model.add_adapter("h", AdapterConfig("houlsby", bottleneck_size=4))
    _perturb(model)
    model.eval()
    inputs = tiny_inputs(model_type)
    with torch.set_grad_enabled(grad):
        alone = {n: _hidden(model, inputs, n) for n in ("d", "d2", "l", "h", None)}
        for names in (["d", "l", "h", None], ["d", "l", "d2", "l"], ["d", "d", "h", None], ["d2", "d", "d", "d2"]):
            mixed = _hidden(model, inputs, names)
            for i, n in enumerate(names):
                torch.testing.assert_close(mixed[i], alone[n][i], atol=TOL, rtol=0)
                if n is None:
                    assert torch.equal(mixed[i], alone[None][i])
    assert not torch.allclose(alone["d"], alone[None], atol=1e-3)  # DoRA changes the outputs


def test_mixed_rows_under_generate_with_beams():
    """generate() repeats each row for its beams: the gathered g per row repeats with them."""
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("d", _dora())
    model.add_adapter("l", AdapterConfig("lora", targets=ALL))
    _perturb(model)
    model.eval()
    ids = tiny_inputs("llama", batch=2)["input_ids"][:, :5]
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["d", "l"], **kw)
        for i, n in enumerate(("d", "l")):
            alone = model.generate(input_ids=ids[i:i + 1], adapter_names=[n], **kw)
            assert torch.equal(mixed[i], alone[0])


def test_save_load_exact_and_shapes_checked(tmp_path):
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("d", _dora(targets=["q", "v", "gate", "down"]), head="classification", labels=["x", "y"])
    _perturb(model)
    model.eval()
    path = model.save_adapter("d", tmp_path / "d.safetensors")
    assert model.adapter_info("d")["config"]["dora"] is True
    assert "dora" not in AdapterConfig("lora").to_dict()  # plain LoRA metadata is as before
    again = model.load_adapter(path, name="e")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert torch.equal(_hidden(model, inputs, "d"), _hidden(model, inputs, again))
    saved = model.adapters["d"].state_dict()
    assert saved["layers.0.v.magnitude"].shape == (16,)  # grouped-query v: 16 outputs
    assert all(torch.equal(v, model.adapters["e"].state_dict()[k]) for k, v in saved.items())
    # on a base with other weights (fingerprint check off) the file's magnitude is kept, not re-initialised
    other = AdapterModel(tiny_model("llama", seed=5)).eval()
    other.load_adapter(path, name="d", check_base=False)
    assert torch.equal(other.adapters["d"].layers[1].down.magnitude, model.adapters["d"].layers[1].down.magnitude)
    # a magnitude of the wrong shape is refused from the header, naming the tensor
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["layers.1.v.magnitude"] = torch.ones(17)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="layers.1.v.magnitude"):
        model.load_adapter(bad, name="bad")
    del tensors["layers.1.v.magnitude"]
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="layers.1.v.magnitude"):
        model.load_adapter(bad, name="bad")
    assert model.list_adapters() == ["d", "e"]


def test_gradients_reach_magnitude_a_b_and_not_the_base():
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("d", _dora(targets=["q", "v"]))
    _perturb(model)
    report = model.train_adapter("d")
    assert report.trainable == 2 * ((3 * 32 + 32 * 3 + 32) + (3 * 32 + 16 * 3 + 16))  # A, B, m at q and v
    model.train()
    inputs = tiny_inputs("llama")
    model(**inputs, adapter_names="d", labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {f"adapters.d.layers.{i}.{p}.{w}" for i in range(2) for p in ("q", "v") for w in ("A", "B", "magnitude")}
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_magnitude_gradient_treats_the_norm_as_a_constant():
    """d loss / d m at one projection equals the formula's gradient with the norm detached (the paper's
    section 4.3), computed here with plain autograd on the weight form."""
    base = tiny_model("bert")
    model = AdapterModel(base)
    site = model.add_adapter("d", _dora(targets=["v"])).layers[0].v
    _perturb(model)
    model.eval()
    ls = model.layer_sites[0]
    seen: dict[str, torch.Tensor] = {}
    # the v projection's input, and the loss's gradient at its (adapted) output, from the model itself
    handles = [ls.attn_v.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach().clone())),
               ls.attn_v.register_forward_hook(lambda m, a, o: o.register_hook(lambda g: seen.__setitem__("g", g)) and None)]
    model.zero_grad()
    model(**tiny_inputs("bert"), adapter_names="d").last_hidden_state.pow(2).sum().backward()
    for h in handles:
        h.remove()
    w, _ = _weight(ls, "attn_v")
    m = site.magnitude.detach().clone().requires_grad_(True)
    a, b = site.A.detach().clone().requires_grad_(True), site.B.detach().clone().requires_grad_(True)
    merged = w + site.scale * (b @ a)
    y = seen["in"] @ (m[:, None] * merged / merged.norm(dim=1, keepdim=True).detach()).T
    (y * seen["g"]).sum().backward()
    for ours, ref in ((site.magnitude.grad, m.grad), (site.A.grad, a.grad), (site.B.grad, b.grad)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_training_dropout_drops_the_input_of_both_terms():
    """While training with dropout (PEFT's maths): y = W x + b + (g - 1) W drop(x) + g s B A drop(x);
    in eval no dropout at all."""
    base = tiny_model("llama")
    model = AdapterModel(base)
    site = model.add_adapter("d", _dora(targets=["v"], dropout=0.5)).layers[0].v
    _perturb(model)
    ls = model.layer_sites[0]
    w, _ = _weight(ls, "attn_v")
    seen: dict[str, torch.Tensor] = {}
    handles = [ls.attn_v.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.detach().clone())),
               ls.attn_v.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach().clone()))]
    inputs = tiny_inputs("llama")
    model.train()
    torch.manual_seed(7)
    model(**inputs, adapter_names="d")
    x, got = seen["in"], seen["out"]
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, 0.5, True)  # the same mask: the first draw after seeding
    with torch.no_grad():
        norm = (w + site.scale * site.B @ site.A).norm(dim=1)
        g = site.magnitude / norm
        expected = x @ w.T + (g - 1) * (dropped @ w.T) + g * site.scale * (dropped @ site.A.T @ site.B.T)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    model.eval()
    with torch.no_grad():
        model(**inputs, adapter_names="d")
        expected = seen["in"] @ (g[:, None] * (w + site.scale * site.B @ site.A)).T
    torch.testing.assert_close(seen["out"], expected, atol=TOL, rtol=0)
    for h in handles:
        h.remove()


def test_inference_cache_follows_weight_changes():
    """g is cached under no_grad; a change of m, B or the base weight itself is seen at once."""
    model = AdapterModel(tiny_model("bert")).eval()
    model.add_adapter("d", _dora(targets=["v"]))
    model.add_adapter("l", AdapterConfig("lora", targets=["v"]))
    inputs = tiny_inputs("bert")
    site = model.adapters["d"].layers[0].v
    with torch.no_grad():
        for names in ("d", ["d", "l", None, "d"]):
            first = _hidden(model, inputs, names)
            site.magnitude.mul_(1.5)
            second = _hidden(model, inputs, names)
            assert not torch.allclose(first, second, atol=1e-3)
            site.magnitude.div_(1.5)
            weight = model.layer_sites[0].attn_v.weight
            kept = weight.clone()
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
            third = _hidden(model, inputs, names)  # the base changes: g follows (m / ||W_new||)
            with torch.enable_grad():  # no cache under autograd: g from scratch
                fresh = _hidden(model, inputs, names).detach()
            weight.copy_(kept)
            assert not torch.allclose(first, third, atol=1e-3)
            torch.testing.assert_close(third, fresh, atol=1e-6, rtol=0)
            torch.testing.assert_close(_hidden(model, inputs, names), first, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="houlsby", dora=True), "dora is a LoRA option"),
        (dict(kind="ia3", dora=True), "dora is a LoRA option"),
        (dict(kind="lora", dora="yes"), "dora must be True or False"),
        (dict(kind="lora", dora=1), "dora must be True or False"),
    ],
)
def test_bad_options_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)
