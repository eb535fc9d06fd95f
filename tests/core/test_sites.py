"""Every row of the site table resolves on a tiny model of its architecture, in this transformers."""

from __future__ import annotations

import pytest
import torch
from tinymodels import ENCODER_DECODERS, TINY, tiny_inputs, tiny_model

from adapterkit import SITES, AdapterConfig, AdapterModel, UnknownArchitecture, sites_for


def test_table_covers_the_required_architectures():
    assert set(TINY) <= set(SITES)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_row_resolves(model_type):
    base = tiny_model(model_type)
    model = AdapterModel(base)
    expected_layers = 4 if model_type in ENCODER_DECODERS else 2  # tiny configs: 2 layers per stack
    assert model.num_layers == expected_layers
    for ls in model.layer_sites:
        assert ls.attn_out is not ls.ffn_out
        assert len(ls.norms) >= 2, f"{model_type} layer {ls.path}: norms {ls.norms}"
        for module in (ls.attn_out, ls.ffn_out):
            assert hasattr(module, "weight")
    # Every site really runs in a forward pass: count hook calls through a routed adapter.
    seen = []
    for ls in model.layer_sites:
        for m in (ls.attn_out, ls.ffn_out, ls.ffn_in):
            m.register_forward_hook(lambda mod, a, o, m=m: seen.append(m))
    model.add_adapter("a", AdapterConfig("houlsby"))
    with torch.no_grad():
        model(**tiny_inputs(model_type), adapter_names="a")
    assert len({id(m) for m in seen}) == 3 * model.num_layers


def test_unknown_model_type_names_what_to_add():
    base = tiny_model("bert")
    base.config.model_type = "my-bert"
    with pytest.raises(UnknownArchitecture, match=r"no site table row for model_type 'my-bert'.*SITES in adapterkit/sites.py"):
        AdapterModel(base)
    with pytest.raises(UnknownArchitecture, match="sites='guess'"):
        sites_for("my-bert")


def test_guess_is_an_explicit_opt_in():
    base = tiny_model("bert")
    base.config.model_type = "my-bert"
    model = AdapterModel(base, sites="guess")
    assert model.sites == SITES["bert"]
    assert model.num_layers == 2


def test_renamed_module_is_reported_by_name():
    from adapterkit.sites import SiteSpec

    spec = SiteSpec(layers=("encoder.layer",), attn_out=("attention.output.proj",), ffn_in=("intermediate",),
                    ffn_out=("output.dense",), norms=())
    with pytest.raises(UnknownArchitecture, match=r"layer encoder.layer.0 has none of \('attention.output.proj',\) \(attn_out\)"):
        AdapterModel(tiny_model("bert"), sites=spec)
