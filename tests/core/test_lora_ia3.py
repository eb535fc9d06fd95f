"""LoRA and IA3 on their own: init, exact maths at a projection, options, merging, artifacts, errors."""

from __future__ import annotations

import math

import pytest
import torch
from tinymodels import FUSED_ROWS, tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel


def _perturb(model: AdapterModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _hidden(model: AdapterModel, inputs: dict, names) -> torch.Tensor:
    out = model(**inputs, adapter_names=names)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("config", [AdapterConfig("lora", targets=["q", "k", "v", "o", "up", "down"]), AdapterConfig("ia3")])
def test_a_new_adapter_is_exactly_the_identity(model_type, config):
    """LoRA's B starts at zero, IA3's vectors at one: outputs are bit-identical to the base's."""
    model = AdapterModel(tiny_model(model_type)).eval()
    model.add_adapter("a", config)
    inputs = tiny_inputs(model_type)
    with torch.no_grad():
        assert torch.equal(_hidden(model, inputs, "a"), _hidden(model, inputs, None))


def test_lora_init_shapes_names_and_scale():
    model = AdapterModel(tiny_model("llama"))  # grouped-query attention: k, v project to 16, not 32
    a = model.add_adapter("a", AdapterConfig("lora", bottleneck_size=4, alpha=12, targets=["q", "v", "gate", "down"]))
    names = set(a.state_dict())
    assert names == {f"layers.{i}.{p}.{w}" for i in range(2) for p in ("q", "v", "gate", "down") for w in ("A", "B")}
    site = a.layers[0]
    assert site.q.A.shape == (4, 32) and site.q.B.shape == (32, 4)
    assert site.v.B.shape == (16, 4) and site.down.A.shape == (4, 37)
    assert torch.count_nonzero(site.q.B) == 0 and site.q.A.abs().max() > 0
    bound = 1 / math.sqrt(32)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert site.q.A.abs().max() <= bound
    assert site.q.scale == 3.0
    rs = model.add_adapter("rs", AdapterConfig("lora", bottleneck_size=4, alpha=12, rslora=True))
    assert rs.layers[0].q.scale == 6.0
    assert AdapterConfig("lora").bottleneck_size == 8 and AdapterConfig("lora").targets == ["q", "v"]
    assert AdapterConfig("lora", targets="v,q").targets == ["q", "v"]


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "gpt_bigcode", "bloom", "falcon", "codegen", "phi3", "deberta"])
def test_lora_maths_at_a_projection(model_type):
    """The hooked projection's output is exactly W x + b + s B A x, for a plain Linear (bert) and on
    its rows of a fused projection (``FUSED_ROWS``, read off each model's attention code): GPT-2's
    Conv1D c_attn [q; k; v], multi-query and grouped-query widths (gpt_bigcode, phi3), q, k, v
    interleaved per head (bloom, deberta) or per key/value head (falcon), CodeGen's [q; v; k] blocks."""
    base = tiny_model(model_type)
    model = AdapterModel(base)
    lora = model.add_adapter("a", AdapterConfig("lora", bottleneck_size=3, alpha=6))
    _perturb(model)
    model.eval()
    ls = model.layer_sites[0]
    target = ls.attn_v
    seen: dict[str, torch.Tensor] = {}
    handles = [target.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.clone())),
               target.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone()))]
    inputs = tiny_inputs(model_type)
    with torch.no_grad():
        base(**inputs)
        reference, x = seen["out"], seen["in"]
        for names in ("a", ["a", None, "a", None]):
            model(**inputs, adapter_names=names)
            got = seen["out"]
            part = FUSED_ROWS.get(model_type, {}).get("attn_v", slice(None))
            site = lora.layers[0].v
            delta = 2.0 * (x @ site.A.T @ site.B.T)
            rows = slice(None) if names == "a" else slice(0, None, 2)
            torch.testing.assert_close(got[rows][..., part], (reference[..., part] + delta)[rows], atol=1e-6, rtol=1e-5)
            if model_type in FUSED_ROWS:  # the fused output's k rows have no LoRA (targets: q, v)
                k = FUSED_ROWS[model_type]["attn_k"]
                assert torch.equal(got[..., k], reference[..., k])
    for h in handles:
        h.remove()


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "bart", "bloom", "falcon", "codegen", "phi3"])
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_merge_and_unmerge(model_type, kind):
    """dora: W <- g (W + s B A), the bias outside the direction and unchanged."""
    lora = dict(bottleneck_size=4, targets=["q", "k", "v", "o", "up", "down"])
    config = AdapterConfig("ia3") if kind == "ia3" else AdapterConfig("lora", dora=kind == "dora", **lora)
    model = AdapterModel(tiny_model(model_type))
    model.add_adapter("a", config)
    model.add_adapter("h", AdapterConfig("houlsby"))
    _perturb(model)
    model.eval()
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    inputs = tiny_inputs(model_type)
    with torch.no_grad():
        unmerged = _hidden(model, inputs, "a")
        model.merge_adapter("a")
        assert model.merged_adapter == "a"
        assert any(not torch.equal(before[k], v) for k, v in model.base.state_dict().items())
        merged = _hidden(model, inputs, "a")
        assert (merged - unmerged).abs().max() <= 1e-5
        if kind == "dora":
            assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items() if k.endswith("bias"))
        assert torch.equal(_hidden(model, inputs, None), merged)  # the default route is the merged adapter
        with pytest.raises(ValueError, match="merged into the base weights"):
            model(**inputs, adapter_names=["a", "h"] + ["a"] * (inputs["input_ids"].shape[0] - 2))
        with pytest.raises(ValueError, match="merged into the base weights"):
            model(**inputs, adapter_names="h")
        with pytest.raises(ValueError, match="unmerge_adapter"):
            model.delete_adapter("a")
        with pytest.raises(ValueError, match="already merged"):
            model.merge_adapter("a")
        for train in (model.train_adapter, model.train_full):  # its tensors are out of the forward pass
            with pytest.raises(ValueError, match="before training"):
                train("a")
        model.unmerge_adapter("a")
    after = model.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    with torch.no_grad():
        assert torch.equal(_hidden(model, inputs, "a"), unmerged)
    with pytest.raises(ValueError, match="no weight form"):
        model.merge_adapter("h")
    with pytest.raises(ValueError, match="is not merged"):
        model.unmerge_adapter("a")


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_while_merged_saves_and_loads_name_the_unmerged_base(tmp_path, kind):
    """The base fingerprint in a file saved while an adapter is merged is the bare base's, so the file
    loads on a clean copy of the base; and a file of that base loads while another adapter is merged."""
    config = AdapterConfig("ia3") if kind == "ia3" else AdapterConfig("lora", dora=kind == "dora", targets=["o", "down"])
    model = AdapterModel(tiny_model("llama", seed=0)).eval()
    model.add_adapter("a", config)
    model.add_adapter("b", AdapterConfig("lora"))
    _perturb(model)
    model.save_adapter("b", tmp_path / "b.safetensors")
    model.delete_adapter("b")
    model.merge_adapter("a")
    saved = model.save_adapter("a", tmp_path / "a.safetensors")
    model.load_adapter(tmp_path / "b.safetensors", name="b")  # the same base, though its weights hold a
    clean = AdapterModel(tiny_model("llama", seed=0)).eval()
    clean.load_adapter(saved, name="a")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(_hidden(clean, inputs, "a"), _hidden(model, inputs, "a"), atol=1e-5, rtol=1e-5)
    model.unmerge_adapter("a")
    assert model.fingerprint() == clean.fingerprint()


@pytest.mark.parametrize("before", [None, "h"])
def test_unmerge_restores_the_active_adapter(before):
    model = AdapterModel(tiny_model("bert")).eval()
    model.add_adapter("a", AdapterConfig("lora"))
    model.add_adapter("h", AdapterConfig("houlsby"))
    _perturb(model)
    model.set_active_adapter(before)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = _hidden(model, inputs, None)  # the default route: ``before``
        model.merge_adapter("a")
        assert model.active_adapter == "a"
        model.unmerge_adapter("a")
        assert model.active_adapter == before
        assert torch.equal(_hidden(model, inputs, None), expected)


def test_dora_reads_no_merged_weights(tmp_path):
    """DoRA's magnitude starts at ||W|| of the base: with another adapter merged into W, adding,
    loading or exporting a DoRA adapter is refused (it would take the merged W for the base's)."""
    from adapterkit.interop import InteropError, export

    model = AdapterModel(tiny_model("bert")).eval()
    model.add_adapter("a", AdapterConfig("lora"))
    model.add_adapter("d", AdapterConfig("lora", dora=True))
    _perturb(model)
    path = model.save_adapter("d", tmp_path / "d.safetensors")
    model.merge_adapter("a")
    with pytest.raises(ValueError, match="DoRA adapter reads the base weights"):
        model.add_adapter("d2", AdapterConfig("lora", dora=True))
    with pytest.raises(ValueError, match="DoRA adapter reads the base weights"):
        model.load_adapter(path, name="d3")
    with pytest.raises(InteropError, match="unmerge_adapter"):
        export(model, "d", tmp_path / "peft", to="peft")
    assert model.list_adapters() == ["a", "d"]
    model.unmerge_adapter("a")
    model.add_adapter("d2", AdapterConfig("lora", dora=True))  # the base's own W: the identity
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert (_hidden(model, inputs, "d2") - _hidden(model, inputs, None)).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_artifact_round_trip_records_the_kind(tmp_path, kind):
    config = AdapterConfig("lora", bottleneck_size=5, alpha=10, targets=["k", "up"], rslora=True) if kind == "lora" else AdapterConfig("ia3", targets=["v", "ff"])
    model = AdapterModel(tiny_model("gpt2"))
    model.add_adapter("a", config, head="classification", labels=["x", "y"])
    _perturb(model)
    model.eval()
    path = model.save_adapter("a", tmp_path / "a.safetensors")
    info_config = model.adapter_info("a")["config"]
    again = model.load_adapter(path, name="b")
    saved = model.adapter_info(again)["config"]
    assert saved["kind"] == kind and saved["targets"] == info_config["targets"]
    if kind == "lora":
        assert (saved["alpha"], saved["rslora"], saved["bottleneck_size"]) == (10.0, True, 5)
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        assert torch.equal(model(**inputs, adapter_names="a").logits, model(**inputs, adapter_names="b").logits)


def test_bottleneck_metadata_has_no_lora_keys():
    assert set(AdapterConfig("houlsby").to_dict()) == {
        "kind", "bottleneck_size", "reduction_factor", "activation", "dropout", "leave_out", "scaling",
        "train_layer_norms", "init_std"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="lora", targets=["q", "x"]), "LoRA targets must be"),
        (dict(kind="lora", targets=[]), "LoRA targets must be"),
        (dict(kind="lora", alpha=0), "alpha must be a finite positive number"),
        (dict(kind="lora", alpha=float("inf")), "alpha must be a finite positive number"),
        (dict(kind="lora", rslora="yes"), "rslora must be True or False"),
        (dict(kind="lora", scaling=2.0), "set alpha"),
        (dict(kind="ia3", targets=["q"]), "IA3 targets must be"),
        (dict(kind="ia3", alpha=4), "LoRA options"),
        (dict(kind="houlsby", targets=["q"]), "take none of them|takes none of them"),
    ],
)
def test_bad_options_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_a_target_the_architecture_lacks_is_named():
    model = AdapterModel(tiny_model("bert"))
    with pytest.raises(ValueError, match="target 'gate' needs the ffn_gate projection.*'bert'"):
        model.add_adapter("a", AdapterConfig("lora", targets=["gate"]))
    assert model.list_adapters() == []


def test_lora_trains_only_its_own_matrices():
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("a", AdapterConfig("lora", bottleneck_size=2))
    report = model.train_adapter("a")
    assert report.trainable == 2 * ((2 * 32 + 32 * 2) + (2 * 32 + 16 * 2))  # per layer: q (A, B) + v (A, B)
    model.train()
    inputs = tiny_inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 8 and all(n.startswith("adapters.a.") for n in grads)
    # at init B = 0: B learns first (its gradient is nonzero), A's gradient is exactly zero
    assert all((g.abs().sum() > 0) == n.endswith(".B") for n, g in grads.items())


def test_hub_publishes_searches_and_serves_each_kind(tmp_path):
    """The hub checks a LoRA / IA3 artifact without a model (projection sizes read from the file),
    searches by kind, and what it serves loads exactly."""
    from adapterkit.hub import LocalRegistry

    model = AdapterModel(tiny_model("llama"))  # grouped-query k, v: the sizes differ per projection
    model.add_adapter("lo", AdapterConfig("lora", bottleneck_size=3, targets=["q", "k", "down"]))
    model.add_adapter("ia", AdapterConfig("ia3"))
    model.add_adapter("ho", AdapterConfig("houlsby", bottleneck_size=4))
    _perturb(model)
    model.eval()
    reg = LocalRegistry(tmp_path / "hub")
    for name in ("lo", "ia", "ho"):
        reg.publish(model.save_adapter(name, tmp_path / f"{name}.safetensors"), f"team/{name}")
    assert [v.adapter for v in reg.search(kind="lora")] == ["team/lo"]
    assert [v.adapter for v in reg.search(kind="ia3")] == ["team/ia"]
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        for name in ("lo", "ia"):
            again = model.load_adapter(reg.download(f"team/{name}"), name=f"{name}2")
            assert torch.equal(model(**inputs, adapter_names=again).logits, model(**inputs, adapter_names=name).logits)
