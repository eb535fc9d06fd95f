"""The kind registry: one table row per adapter kind (``adapterkit/kinds/``, one module each).

For every kind: its positions, defaults and exact state-dict names; its maths at its first position
(the hooked module's output, exactly the base's output plus the bottleneck's delta); rows of every kind
in one mixed batch equal each row alone; a save / load round trip is exact. Then the registry's
contract for kinds with maths of their own: a module class routing has never seen shares a mixed
batch with the bottleneck kinds.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import tiny_inputs, tiny_model
from torch import nn

from adapterkit import AdapterConfig, AdapterModel, kinds
from adapterkit.kinds import AdapterKind, SiteModule

# kind -> (positions and their feeds, default scaling, trains layer norms by default)
KIND_ROWS = {
    "houlsby": ({"attn": "output", "ffn": "output"}, 1.0, True),
    "pfeiffer": ({"ffn": "output"}, 1.0, False),
    "parallel": ({"ffn": "input"}, 4.0, False),
    "serial_attention": ({"attn": "output"}, 1.0, False),
}


# Kinds sized by the projection they act on, tested in test_lora_ia3.py and test_kinds_mixed.py
# (prefix tuning, sized by the value projection, in test_prefix.py).
SIZED_KINDS = ["lora", "ia3", "prefix"]


def test_every_registered_kind_has_a_row():
    assert list(kinds.KINDS) == list(KIND_ROWS) + SIZED_KINDS


def _perturbed(model: AdapterModel, seed: int) -> AdapterModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("kind", list(KIND_ROWS))
def test_kind_declares_positions_defaults_and_tensor_names(kind):
    sites, scaling, norms = KIND_ROWS[kind]
    config = AdapterConfig(kind, bottleneck_size=3)
    assert (config.sites, config.scaling, config.train_layer_norms) == (tuple(sites), scaling, norms)
    assert config.parallel == ("input" in sites.values())
    model = AdapterModel(tiny_model("bert"))
    adapter = model.add_adapter("a", config)
    expected = {f"layers.{i}.{p}.{lin}.{w}" for i in range(2) for p in sites for lin in ("down", "up") for w in ("weight", "bias")}
    expected |= {f"layers.{i}.norms.{j}.{w}" for i in range(2) for j in range(2) for w in ("scale", "shift")} if norms else set()
    assert set(adapter.state_dict()) == expected
    assert [adapter.layers[0].site(p) is not None for p in ("attn", "ffn")] == [p in sites for p in ("attn", "ffn")]


@pytest.mark.parametrize("kind", list(KIND_ROWS))
def test_kind_maths_at_its_first_position(kind):
    """Layer 0's first adapted position sees exactly the base's tensors there: its hooked output must be
    the base's output plus scaling * up(act(down(feed))), the feed being that output or the FFN input."""
    sites = KIND_ROWS[kind][0]
    position = next(p for p in ("attn", "ffn") if p in sites)
    base = tiny_model("bert")
    model = AdapterModel(base)
    module = model.add_adapter("a", AdapterConfig(kind, bottleneck_size=5, activation="tanh", scaling=1.5)).layers[0].site(position)
    _perturbed(model, 3)
    ls = model.layer_sites[0]
    hooked = ls.attn_out if position == "attn" else ls.ffn_out
    seen: dict[str, torch.Tensor] = {}
    handles = [hooked.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.clone())),
               ls.ffn_in.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone()))]
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        base(**inputs)
        reference, feed = seen["out"], (seen["in"] if sites[position] == "input" else seen["out"])
        model(**inputs, adapter_names="a")
        single = seen["out"]
        model(**inputs, adapter_names=["a", None, "a", None])
        mixed = seen["out"]
    for h in handles:
        h.remove()
    delta = 1.5 * (torch.tanh(feed @ module.down.weight.T + module.down.bias) @ module.up.weight.T + module.up.bias)
    torch.testing.assert_close(single, reference + delta, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[0::2], (reference + delta)[0::2], atol=1e-6, rtol=1e-5)
    assert torch.equal(mixed[1::2], reference[1::2])  # rows without an adapter: exactly the base's


def test_rows_of_every_kind_in_one_batch_equal_each_row_alone(tmp_path):
    model = AdapterModel(tiny_model("bert"))
    names = list(KIND_ROWS)
    for k, kind in enumerate(names):
        model.add_adapter(kind, AdapterConfig(kind, bottleneck_size=2 + k, activation=("gelu", "relu")[k % 2]))
    _perturbed(model, 0)
    rows = [*names, None, names[0]]
    inputs = tiny_inputs("bert", batch=len(rows))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=rows).last_hidden_state
        for i, name in enumerate(rows):
            alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapter_names=[name]).last_hidden_state[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
        for kind in names:  # and each kind survives its artifact exactly
            model.save_adapter(kind, tmp_path / f"{kind}.safetensors")
            again = model.load_adapter(tmp_path / f"{kind}.safetensors", name=f"{kind}_again")
            assert model.adapter_info(again)["config"]["kind"] == kind
            assert torch.equal(model(**inputs, adapter_names=again).last_hidden_state,
                               model(**inputs, adapter_names=kind).last_hidden_state)


class _Gain(SiteModule):
    """A per-channel gain on the FFN output (IA3-like): maths routing has never seen, for the contract."""

    def __init__(self, hidden_size: int, config: AdapterConfig, feed: str = "output", **factory):
        super().__init__()
        self.feed = feed
        self.gain = nn.Parameter(torch.ones(hidden_size, **factory))

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
        (gain,) = route.gather(("gain", layer, position), members, out.dtype, out.device,
                               lambda: (torch.ones(d, dtype=out.dtype, device=out.device),),
                               lambda m: (m.gain.to(out.dtype),))
        n = out.shape[0]
        return (out.reshape(n, -1, out.shape[-1]) * route.expand(gain, n)[:, None]).reshape(out.shape)


def test_a_kind_with_its_own_maths_shares_a_mixed_batch(monkeypatch):
    monkeypatch.setitem(kinds.KINDS, "test_gain", AdapterKind("test_gain", {"ffn": "output"}, _Gain))
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("g", AdapterConfig("test_gain"))
    model.add_adapter("h", AdapterConfig("houlsby", bottleneck_size=3))
    model.add_adapter("p", AdapterConfig("parallel", bottleneck_size=4))
    _perturbed(model, 1)
    assert set(model.adapters["g"].state_dict()) == {"layers.0.ffn.gain", "layers.1.ffn.gain"}
    rows = ["g", "h", None, "p", "g"]
    inputs = tiny_inputs("bert", batch=len(rows))
    for grad in (False, True):  # from the model's stacks, and stacked afresh under autograd
        with torch.set_grad_enabled(grad):
            mixed = model(**inputs, adapter_names=rows).last_hidden_state
            for i, name in enumerate(rows):
                alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapter_names=[name]).last_hidden_state[0]
                torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
    g = model.adapters["g"].layers[0].ffn.gain
    assert g.grad is None
    model(**inputs, adapter_names=rows).last_hidden_state.sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_a_kind_is_checked_when_it_is_declared():
    with pytest.raises(ValueError, match="unknown position 'nowhere'"):
        AdapterKind("bad", {"nowhere": "output"}, _Gain)
    with pytest.raises(ValueError, match="position 'attn' has no input site"):
        AdapterKind("bad", {"attn": "input"}, _Gain)
