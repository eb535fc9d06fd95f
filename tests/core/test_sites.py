"""Choosing sites (table, guess, SiteSpec) and refusing the layouts per-row adapters would get wrong.

The table itself is checked row by row in test_architectures.py."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from tinymodels import TINY, tiny_inputs, tiny_model

from adapterkit import SITES, AdapterConfig, AdapterModel, UnknownArchitecture, sites_for
from adapterkit.site_check import SiteCheckError
from adapterkit.sites import SiteSpec, guess_sites, parse_sites


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
    assert "guessed: the row of" in model.sites_report()


def test_renamed_module_is_reported_by_name():
    spec = SiteSpec(layers=("encoder.layer",), attn_out=("attention.output.proj",), ffn_in=("intermediate",),
                    ffn_out=("output.dense",), norms=())
    with pytest.raises(UnknownArchitecture, match=r"layer encoder.layer.0 has none of \('attention.output.proj',\) \(attn_out\)"):
        AdapterModel(tiny_model("bert"), sites=spec)


@pytest.mark.parametrize("model_type", ["roberta-prelayernorm", "vit", "qwen3", "gemma2", "mbart", "olmo2", "megatron-bert"])
def test_guess_prefers_the_row_that_finds_the_norms(model_type):
    """The first row whose projections resolve is not enough: BERT's row resolves on RoBERTa-PreLayerNorm
    but finds none of its norms. Guess takes the row that resolves the most, norms included."""
    base = tiny_model(model_type)
    row = AdapterModel(base, verify=False)
    want = [[n for n, _ in ls.norms] for ls in row.layer_sites]
    row.detach()
    guessed = AdapterModel(base, sites="guess")
    assert [[n for n, _ in ls.norms] for ls in guessed.layer_sites] == want
    assert all(want)


def test_guess_that_finds_nothing_lists_what_there_is():
    base = tiny_model("bert")
    for layer in base.encoder.layer:  # rename every module a row could name
        layer.attention.output.proj = layer.attention.output.dense
        del layer.attention.output.dense
    with pytest.raises(UnknownArchitecture) as e:
        guess_sites(base)
    text = str(e.value)
    assert "layer lists: encoder.layer (2 x BertLayer)" in text
    assert "attention.output.proj (Linear)" in text and "output.LayerNorm (LayerNorm)" in text


def test_time_major_layers_are_refused_naming_the_site():
    """FSMT's layers see (T, B, d): hooked as BART's row, a mixed batch would give rows each other's
    adapters (8.6e-2 off, silently). Refused by the table, by guess and by the dry pass."""
    base = tiny_model("fsmt")
    with pytest.raises(UnknownArchitecture, match="time-major"):
        AdapterModel(base)
    for sites in ("guess", SITES["bart"]):
        with pytest.raises(SiteCheckError, match=r"model\.encoder\.layers\.0\.self_attn\.out_proj's output does not lead "
                                                 r"with the batch .*time-major \(T, B, d\) = \(5, 2, 32\)"):
            AdapterModel(base, sites=sites)
    assert not [m for m in base.modules() if m._forward_hooks or m._forward_pre_hooks]  # nothing left behind


def test_flattened_tokens_must_be_declared():
    """OPT's FFN sees (B·T, d). Its row declares it (and a mixed batch is right: test_architectures);
    the same row without the declaration is refused, naming the first flattened site."""
    base = tiny_model("opt")
    undeclared = dataclasses.replace(SITES["opt"], flat=())
    with pytest.raises(SiteCheckError, match=r"model\.decoder\.layers\.0\.fc1's input does not lead with the batch.*"
                                             r"flattened to \(B·T, d\) = \(10, 32\).*SiteSpec\.flat"):
        AdapterModel(base, sites=undeclared)
    model = AdapterModel(base)
    assert "flattened (B·T, d): fc1, fc2, final_layer_norm" in model.sites_report()


def test_opt_mixed_generate_with_beams():
    """Beams repeat each row; the flattened FFN then holds each row's beams' tokens as one block."""
    base = tiny_model("opt")
    model = AdapterModel(base)
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model.add_adapter(name, AdapterConfig("houlsby", bottleneck_size=4, init_std=0.5))
    prompts = tiny_inputs("opt")["input_ids"][[0, 3], :6]
    kwargs = dict(min_new_tokens=3, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    both = model.generate(prompts, adapter_names=["a", "b"], **kwargs)
    assert torch.equal(both[0], model.generate(prompts, adapter_names="a", **kwargs)[0])
    assert torch.equal(both[1], model.generate(prompts, adapter_names="b", **kwargs)[1])


def test_a_shared_layer_must_be_declared():
    """ALBERT runs one layer at every depth: undeclared, its hooks fire twice per forward (refused);
    its row declares it, and one adapter then applies at every depth."""
    base = tiny_model("albert")
    with pytest.raises(SiteCheckError, match=r"albert_layers\.0\.attention\.dense runs 2 times per forward pass.*shared=True"):
        AdapterModel(base, sites=dataclasses.replace(SITES["albert"], shared=False))
    model = AdapterModel(base)
    assert model.num_layers == 1 and "shared layers" in model.sites_report()


def test_sites_report_names_every_layer_and_norm():
    model = AdapterModel(tiny_model("t5"))
    report = model.sites_report()
    assert report.startswith("t5: 4 layers, sites from the site table's row for 't5'")
    assert "decoder.block.1: attn_out=layer.0.SelfAttention.o ffn_in=layer.2.DenseReluDense" in report
    assert "norms=[layer.0.layer_norm, layer.1.layer_norm, layer.2.layer_norm]" in report


def test_a_kind_that_trains_norms_warns_when_there_are_none():
    spec = dataclasses.replace(SITES["bert"], norms=())
    model = AdapterModel(tiny_model("bert"), sites=spec)
    with pytest.warns(UserWarning, match="houlsby adapter trains layer-norm affines, but no norm was found in any layer"):
        model.add_adapter("h", AdapterConfig("houlsby"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.add_adapter("p", AdapterConfig("pfeiffer"))  # trains no norms: nothing to say


def test_a_row_that_misses_some_layers_norms_warns_at_attach():
    spec = dataclasses.replace(SITES["bert"], norms=("no.such.norm",))
    with pytest.warns(UserWarning, match="layers encoder.layer.0, encoder.layer.1 have none of the norms"):
        AdapterModel(tiny_model("bert"), sites=spec)


def test_sitespec_from_json_and_the_command_line_form(tmp_path):
    spec = SITES["opt"]
    assert SiteSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert parse_sites(json.dumps(spec.to_dict())) == spec
    path = tmp_path / "sites.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert parse_sites(str(path)) == spec
    assert parse_sites("guess") == "guess" and parse_sites(None) is None
    with pytest.raises(ValueError, match="unknown SiteSpec key.*layer_names"):
        SiteSpec.from_dict({**spec.to_dict(), "layer_names": []})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_sites("{nope")
    with pytest.raises(ValueError, match="none of these"):
        parse_sites(str(tmp_path / "missing.json"))


def test_verification_runs_once_per_base_and_spec():
    base = tiny_model("bert")
    calls = []
    handle = base.register_forward_hook(lambda *a: calls.append(1))
    AdapterModel(base).detach()
    AdapterModel(base).detach()
    assert len(calls) == 1
    handle.remove()


def test_vision_fingerprint_and_the_lm_as_base_model(tmp_path):
    """ViT's input embedding is a patch convolution module (no .weight); gemma3_text on 4.57 names its
    base model ``language_model``, so ``base_model`` is the LM itself: heads read its decoder."""
    vit = AdapterModel(tiny_model("vit"))
    vit.add_adapter("v")
    assert vit.load_adapter(vit.save_adapter("v", tmp_path / "v.safetensors"), "v2") == "v2"
    gemma = AdapterModel(tiny_model("gemma3_text"))
    gemma.add_adapter("c", head="classification", labels=["x", "y"])
    with torch.no_grad():
        out = gemma(**tiny_inputs("gemma3_text"), adapter_names="c")
    assert out.logits.shape == (4, 2)


def test_fused_projection_layouts_are_checked():
    """A row's fused q/k/v layout is validated when written, and against the model's widths at attach;
    it survives the JSON form of ``--sites``."""
    with pytest.raises(ValueError, match="qkv_groups must be a positive integer or 'kv_heads'"):
        dataclasses.replace(SITES["bloom"], qkv_groups=0)
    with pytest.raises(ValueError, match="qkv_order must order the letters q, k, v"):
        dataclasses.replace(SITES["bloom"], qkv_order="qqv")
    with pytest.raises(UnknownArchitecture, match=r"query_key_value has 96 outputs, which do not split .* in 5 block"):
        AdapterModel(tiny_model("bloom"), sites=dataclasses.replace(SITES["bloom"], qkv_groups=5))
    for model_type in ("codegen", "bloom", "phi3"):
        assert SiteSpec.from_dict(json.loads(json.dumps(SITES[model_type].to_dict()))) == SITES[model_type]


def test_tiny_table_lists_only_known_types():
    assert set(TINY) <= set(SITES) | {"fsmt"}


def test_the_architectures_page_is_generated_from_the_table():
    """docs/architectures.md is up to date: regenerate with ``python -m adapterkit.coverage``."""
    from pathlib import Path

    from adapterkit.coverage import architectures_page

    page = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
    assert page.read_text(encoding="utf-8") == architectures_page(), "run: python -m adapterkit.coverage"
