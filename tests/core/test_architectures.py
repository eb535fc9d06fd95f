"""Every row of the site table, on a tiny random model of its architecture, in this transformers:
attach (with the dry-pass verification), no adapter == bare (bit-identical), a mixed batch == each
row alone, generate where the model generates, a head where the row pools, save / load, detach."""

from __future__ import annotations

import pytest
import torch
from tinymodels import FAMILY, TINY, tiny_inputs, tiny_model

from adapterkit import SITES, AdapterConfig, AdapterModel

TOL = 1e-5
KINDS = {"a": AdapterConfig("houlsby", bottleneck_size=4), "b": AdapterConfig("parallel", bottleneck_size=3)}


def _main(out) -> torch.Tensor:
    """The output a row's adapter changes: an LM's logits, else the last hidden state."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _hook_state(model: torch.nn.Module) -> list[tuple]:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__) for n, m in model.named_modules()]


def _randomize(adapter: torch.nn.Module, seed: int) -> None:
    """Adapters start near the identity; make them act visibly (norm affines included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if name.endswith("scale") else noise)


def _expected_layers(model_type: str) -> int:
    if model_type == "albert":
        return 1  # one shared layer
    return 4 if FAMILY[model_type] == "encoder-decoder" else 2


@pytest.mark.parametrize("model_type", sorted(set(TINY) & set(SITES)))
def test_architecture(model_type, tmp_path):
    base = tiny_model(model_type)
    inputs = tiny_inputs(model_type)
    before = _hook_state(base)
    with torch.no_grad():
        bare = _main(base(**inputs))

    model = AdapterModel(base)
    assert model.sites == SITES[model_type]
    assert model.num_layers == _expected_layers(model_type)
    assert all(ls.norms for ls in model.layer_sites), model.sites_report()
    for name, config in KINDS.items():
        _randomize(model.add_adapter(name, config), seed=len(name))

    with torch.no_grad():
        assert torch.equal(_main(model(**inputs)), bare)  # nothing routed: bit-identical
        alone = {name: _main(model(**inputs, adapter_names=name)) for name in KINDS}
        mixed = _main(model(**inputs, adapter_names=["a", "b", None, "a"]))
    assert (alone["a"] - bare).abs().max() > 1e-3  # the adapters really act
    for row, name in enumerate(["a", "b", None, "a"]):
        expected = bare[row] if name is None else alone[name][row]
        torch.testing.assert_close(mixed[row], expected, atol=TOL, rtol=0)

    if FAMILY[model_type] in ("decoder", "encoder-decoder"):
        full = inputs["attention_mask"].bool().all(dim=1)  # unpadded prompts: no padding-side questions
        prompts = inputs["input_ids"][full][:2, :6]
        pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
        kwargs = dict(min_new_tokens=3, max_new_tokens=3, do_sample=False, pad_token_id=pad)
        plain = base.generate(prompts, **kwargs)
        assert torch.equal(model.generate(prompts, **kwargs), plain)
        gen = {name: model.generate(prompts, adapter_names=name, **kwargs) for name in KINDS}
        both = model.generate(prompts, adapter_names=["a", "b"], **kwargs)
        assert torch.equal(both[0], gen["a"][0]) and torch.equal(both[1], gen["b"][1])

    if model.sites.pooling is not None:  # a task head on the backbone, each row through its own
        model.add_adapter("c", AdapterConfig("pfeiffer"), head="classification", labels=["x", "y", "z"])
        with torch.no_grad():
            logits = model(**inputs, adapter_names="c").logits
        assert logits.shape == (next(iter(inputs.values())).shape[0], 3) and torch.isfinite(logits).all()

    path = model.save_adapter("a", tmp_path / "a.safetensors")
    assert model.load_adapter(path, "a2") == "a2"
    with torch.no_grad():
        assert torch.equal(_main(model(**inputs, adapter_names="a2")), alone["a"])

    assert model.detach() is base
    assert _hook_state(base) == before
    with torch.no_grad():
        assert torch.equal(_main(base(**inputs)), bare)


def test_the_table_covers_forty_architectures():
    assert len(set(TINY) & set(SITES)) >= 40
    assert set(TINY) - {"fsmt"} <= set(SITES)
