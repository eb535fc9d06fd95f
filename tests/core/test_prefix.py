"""Prefix tuning (``kinds/prefix.py``) on decoders: shapes, the maths against a KV cache built by hand,
per-row mixing with other kinds in forward and ``generate``, training, artifacts, and what it refuses.
Encoders, encoder-decoders and the reparameterisation MLP: ``test_prefix_encoders.py``.

Tiny random llama (grouped-query attention, RoPE) and gpt2 (fused Conv1D, learned positions), under
whichever transformers the venv has (4.57: ``past_key_values`` + ``cache_position``; 5.x: ``cache``).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tinymodels import TINY, tiny_inputs, tiny_model, train_steps
from transformers import AutoConfig, DynamicCache

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.artifact import ArtifactError, expected_shapes, read_header
from adapterkit.kinds import prefix as prefix_kind

TOL = 1e-5
DECODERS = ["llama", "gpt2"]
# every decoder the kind takes but GPT-Neo, whose tiny local-attention window (8) is narrower than these
# tests' prefixes and texts (test_sliding_and_local_windows)
EVERY_DECODER = sorted(set(prefix_kind.DECODERS) - {"gpt_neo"})
# per family: ALiBi (bloom), per-head fused q/k/v (gpt_neox), OPT's decoder called past its backbone,
# grouped-query fused qkv (phi3), mixture of experts (mixtral), sliding windows (gemma2)
FAMILIES = ["bloom", "gpt_neox", "opt", "phi3", "mixtral", "gemma2"]
CONFIGS = {
    "p4": AdapterConfig("prefix", bottleneck_size=4, init_std=0.5),
    "p7": AdapterConfig("prefix", bottleneck_size=7, init_std=0.5),
    "lora": AdapterConfig("lora", bottleneck_size=4, targets=["q", "v", "down"]),
    "houlsby": AdapterConfig("houlsby", bottleneck_size=5),
}
ROWS = ["p4", "p7", None, "lora", "houlsby", "p4"]


def _build(model_type: str, seed: int = 0) -> AdapterModel:
    model = AdapterModel(tiny_model(model_type, seed=seed))
    for name, config in CONFIGS.items():
        if name == "lora" and model_type == "mixtral":  # its FFN is a mixture of experts: no "down" projection
            config = AdapterConfig("lora", bottleneck_size=4, targets=["q", "v", "o"])
        model.add_adapter(name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA's B and the bottlenecks start (near) zero: move them so mistakes show
        for name, p in model.adapters.named_parameters():
            if not name.startswith("p"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _row(inputs: dict, i: int) -> dict:
    """Row i alone, without its (right) padding."""
    n = int(inputs["attention_mask"][i].sum())
    return {k: v[i : i + 1, :n] for k, v in inputs.items()}


def _cache_arg(base) -> str:
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def test_config_defaults_shapes_and_names():
    config = AdapterConfig("prefix")
    assert (config.bottleneck_size, config.sites, config.train_layer_norms, config.scaling) == (10, ("prefix",), False, 1.0)
    for model_type, kv_dim in (("llama", 16), ("gpt2", 32)):  # llama: 2 kv heads of 8; gpt2: 4 heads of 8
        model = AdapterModel(tiny_model(model_type))
        a = model.add_adapter("a", AdapterConfig("prefix", bottleneck_size=3))
        shapes = {k: tuple(v.shape) for k, v in a.state_dict().items()}
        assert shapes == {f"layers.{i}.prefix.{w}": (3, kv_dim) for i in range(2) for w in ("key", "value")}
    with pytest.raises(ValueError, match="weight form"):
        model.merge_adapter("a")


@pytest.mark.parametrize("model_type", EVERY_DECODER)
def test_forward_equals_a_cache_built_by_hand(model_type):
    """One prefix adapter on a right-padded batch equals the bare base model run on a DynamicCache we
    fill ourselves, a mask of ones over the prefix and position ids from 0; no route is bit-identical."""
    model = AdapterModel(tiny_model(model_type))
    base = model.base
    a = model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=4, init_std=0.5))
    inputs = tiny_inputs(model_type, batch=4)
    n, t = inputs["input_ids"].shape
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    for i, layer in enumerate(a.layers):
        k, v = (p.detach()[None].expand(n, -1, -1).reshape(n, 4, -1, head_dim).transpose(1, 2) for p in layer.prefix.params)
        cache.update(k, v, i)
    kwargs = {_cache_arg(base): cache}
    if "cache_position" in inspect.signature(base.forward).parameters:  # 4.57: indices into the cache
        kwargs["cache_position"] = torch.arange(4, 4 + t)
    mask = torch.cat([torch.ones(n, 4, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        reference = base(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=torch.arange(t)[None], **kwargs).logits
        ours = model(**inputs, adapter_names="p").logits
        bare = base(**inputs).logits
        unrouted = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ours - reference)[real].abs().max() <= 1e-6
    assert (ours - bare)[real].abs().max() > 1e-3  # the prefix acts
    assert torch.equal(unrouted, bare)
    # a decoding loop by hand, with neither mask nor position ids: the returned cache continues the prefix
    ids = inputs["input_ids"][:1]
    with torch.no_grad():
        out = model(input_ids=ids[:, :5], use_cache=True, adapter_names="p")
        for s in range(5, 8):
            step = model(input_ids=ids[:, s : s + 1], use_cache=True, adapter_names="p",
                         **{_cache_arg(base): out.past_key_values})
            full = model(input_ids=ids[:, : s + 1], adapter_names="p").logits[0, -1]
            assert (step.logits[0, -1] - full).abs().max() <= TOL, s
            out = step


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("model_type", [*DECODERS, "mistral", "qwen2", *FAMILIES])
def test_mixed_rows_forward_equal_each_row_alone(model_type, grad):
    """Prefixes of lengths 4 and 7, no adapter, LoRA and a bottleneck in one batch: each row equals
    that row alone (unpadded), from the model's stacks and stacked afresh under autograd."""
    model = _build(model_type)
    with torch.set_grad_enabled(grad):
        _check_rows_alone(model, tiny_inputs(model_type, batch=len(ROWS)), ROWS)


def _check_rows_alone(model: AdapterModel, inputs: dict, rows: list) -> None:
    """Each row of a mixed batch equals that row alone (unpadded); only rows with an adapter differ
    from the bare model."""
    mixed = model(**inputs, adapter_names=rows).logits
    for i, name in enumerate(rows):
        alone = model(**_row(inputs, i), adapter_names=[name]).logits[0]
        assert (mixed[i, : alone.shape[0]] - alone).abs().max() <= TOL, (i, name)
        bare = model.base(**_row(inputs, i)).logits[0]
        assert ((mixed[i, : bare.shape[0]] - bare).abs().max() > 1e-3) == (name is not None), (i, name)


def _left_padded(batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad = (i % 3) * 2
        ids[i, :pad], mask[i, :pad] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("model_type", [*DECODERS, *FAMILIES])
def test_mixed_rows_generate_equal_each_row_alone(model_type, num_beams):
    model = _build(model_type)
    inputs = _left_padded(len(ROWS), seed=3)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    mixed = model.generate(**inputs, adapter_names=ROWS, **kw)
    width = inputs["input_ids"].shape[1]
    for i, name in enumerate(ROWS):
        pad = int((inputs["attention_mask"][i] == 0).sum())
        row = {k: v[i : i + 1, pad:] for k, v in inputs.items()}
        alone = model.generate(**row, adapter_names=[name], **kw)
        new = alone.sequences[0, row["input_ids"].shape[1]:]  # may stop early at EOS; the batch pads on
        assert torch.equal(mixed.sequences[i, width : width + len(new)], new), (i, name)
        for step_mixed, step_alone in zip(mixed.scores, alone.scores):
            k = num_beams  # each row's beams are consecutive
            assert (step_mixed[i * k : (i + 1) * k] - step_alone).abs().max() <= TOL, (i, name)
    if num_beams == 1:  # each decoding step (the cache continued) equals a forward over the whole text so far
        logits = model.generate(**inputs, adapter_names=ROWS, **{**kw, "output_logits": True}).logits
        for i, name in enumerate(ROWS):
            pad = int((inputs["attention_mask"][i] == 0).sum())
            for s in range(len(logits)):
                text = mixed.sequences[i : i + 1, pad : width + s]
                full = model(input_ids=text, adapter_names=[name]).logits[0, -1]
                assert (logits[s][i] - full).abs().max() <= TOL, (i, name, s)
                if name is not None and name.startswith("p"):  # and the prefix acts at every step
                    assert (model.base(input_ids=text).logits[0, -1] - full).abs().max() > 1e-3
    # without a mask (5.x drops an all-ones one) the prefix still applies, and equals the masked call
    one = {"input_ids": inputs["input_ids"][:1]}
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**one, adapter_names="p7", **greedy),
                       model.generate(**one, attention_mask=torch.ones_like(one["input_ids"]), adapter_names="p7", **greedy))


@pytest.mark.parametrize("model_type", DECODERS)
def test_gradients_reach_the_prefixes_only_and_training_lowers_the_loss(model_type):
    model = _build(model_type, seed=1)
    inputs = tiny_inputs(model_type, batch=len(ROWS))
    params = dict(model.adapters.named_parameters())
    # mixed batch: each adapter's gradient is the sum of its rows' gradients run alone
    model.zero_grad()
    mixed = model(**inputs, adapter_names=ROWS).logits
    (mixed * inputs["attention_mask"][..., None]).sum().backward()
    from_mixed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(ROWS):
        model(**_row(inputs, i), adapter_names=[name]).logits.sum().backward()
    from_alone = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert set(from_mixed) == set(from_alone) and {n.split(".")[0] for n in from_alone} == set(CONFIGS)
    for n in from_alone:
        torch.testing.assert_close(from_mixed[n], from_alone[n], atol=1e-4, rtol=1e-4, msg=n)
    # training one prefix adapter: only its parameters move, the loss goes down
    model.zero_grad()
    report = model.train_adapter("p4")
    assert report.trainable == sum(p.numel() for p in model.adapters["p4"].parameters())
    batch = {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}
    losses, before = train_steps(model, batch, "p4")
    assert losses[-1] < losses[0] - 0.05, losses
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {f"adapters.p4.layers.{i}.prefix.{w}" for i in range(2) for w in ("key", "value")}


@pytest.mark.parametrize("model_type", DECODERS)
def test_artifact_round_trip_and_shape_checks(model_type, tmp_path):
    model = _build(model_type)
    path = model.save_adapter("p7", tmp_path / "p7.safetensors")
    header = read_header(path)
    assert {k: t.shape for k, t in header.tensors.items()} == {k: tuple(v.shape) for k, v in model.adapters["p7"].state_dict().items()}
    again = model.load_adapter(path, name="again")
    assert model.adapter_info(again)["config"]["bottleneck_size"] == 7
    inputs = tiny_inputs(model_type, batch=3)
    with torch.no_grad():
        assert torch.equal(model(**inputs, adapter_names="again").logits, model(**inputs, adapter_names="p7").logits)
        mixed = model(**inputs, adapter_names=["again", "p4", None]).logits
        assert (mixed[0] - model(**inputs, adapter_names=["p7", "p4", None]).logits[0]).abs().max() <= TOL
    # without a model (the hub): the shapes follow from the file's own tensors
    from adapterkit.artifact import header_metadata

    doc = header_metadata(header)
    assert expected_shapes(doc, model.hidden_size, [len(ls.norms) for ls in model.layer_sites], "last",
                           tensor_shapes={k: t.shape for k, t in header.tensors.items()}) == {k: t.shape for k, t in header.tensors.items()}
    # another model's kv width is refused from the header, before anything is built
    other = AdapterModel(tiny_model("gpt2" if model_type == "llama" else "llama"))
    with pytest.raises(ArtifactError, match="shapes do not match"):
        other.load_adapter(path, check_base=False)
    assert other.list_adapters() == []


@pytest.mark.parametrize("model_type", ["gpt_neo", "mistral"])
def test_sliding_and_local_windows(model_type):
    """GPT-Neo's local layers (window 8 here) and Mistral's sliding window (set to 8) count the prefix as
    the cache's first positions: while the prefix and the tokens fit the window, mixed rows equal each
    row alone; past it the call is refused, naming the window."""
    kwargs, auto = TINY[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(kwargs if model_type == "gpt_neo" else dict(kwargs, sliding_window=8)))
    model = AdapterModel(auto.from_config(config).eval())
    model.add_adapter("p3", AdapterConfig("prefix", bottleneck_size=3, init_std=0.5))
    model.add_adapter("p2", AdapterConfig("prefix", bottleneck_size=2, init_std=0.5))
    rows = ["p3", "p2", None]
    with torch.no_grad():
        _check_rows_alone(model, tiny_inputs(model_type, batch=3, seq=5), rows)  # 3 prefix positions + 5 tokens: the window
        with pytest.raises(ValueError, match="attention sees 8 positions, and 3 prefix positions \\+ 6 tokens exceed it"):
            model(**tiny_inputs(model_type, batch=3, seq=6), adapter_names=rows)


def test_refusals():
    # a decoder refused with its reason, and one of no known type (a Llama renamed, sites guessed): untested;
    # encoders / encoder-decoders: tests/core/test_prefix_encoders.py
    model = AdapterModel(tiny_model("falcon"))
    with pytest.raises(ValueError, match="does not support 'falcon': transformers 4.57's Falcon caches"):
        model.add_adapter("p", AdapterConfig("prefix"))
    assert model.list_adapters() == [] and "prefix" not in model._attachment.hooked
    renamed = tiny_model("llama")
    renamed.config.model_type = "my-llama"
    model = AdapterModel(renamed, sites="guess")
    with pytest.raises(ValueError, match="does not support 'my-llama': untested. It is wired up for decoders"):
        model.add_adapter("p", AdapterConfig("prefix"))
    for bad, match in ((dict(leave_out=[0]), "cannot leave layers out"), (dict(reduction_factor=4), "not a reduction_factor"),
                       (dict(dropout=0.1), "no dropout"), (dict(scaling=2.0), "no scaling"), (dict(targets=["k"]), "LoRA / IA3")):
        with pytest.raises(ValueError, match=match):
            AdapterConfig("prefix", **bad)
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=2))
    inputs = tiny_inputs("llama", batch=2)
    # a cache holding tokens the prefix did not start
    with torch.no_grad():
        past = model.base(**inputs, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="empty KV cache"):
            model(input_ids=inputs["input_ids"][:, :1], **{_cache_arg(model.base): past}, adapter_names="p")
        with pytest.raises(ValueError, match="2-D attention mask"):
            model(input_ids=inputs["input_ids"], attention_mask=torch.ones(2, 1, 9, 9), adapter_names="p")
    # gradient checkpointing drops the cache in checkpointed layers: refused in training
    model.gradient_checkpointing_enable()
    model.train_adapter("p")
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**inputs, adapter_names="p")
    model.eval()  # in eval mode checkpointing is off: fine
    with torch.no_grad():
        model(**inputs, adapter_names="p")


@pytest.mark.parametrize("model_type", [*DECODERS, "roberta"])
def test_classification_heads_over_prefixes(model_type):
    """Heads read the backbone's hidden states (the hooked module itself): mixed rows equal each alone."""
    model = AdapterModel(tiny_model(model_type))
    for name, p in (("a", 3), ("b", 6)):
        model.add_adapter(name, AdapterConfig("prefix", bottleneck_size=p, init_std=0.5), head="classification", labels=["x", "y"])
    model.eval()
    inputs = tiny_inputs(model_type, batch=4)
    rows = ["a", "b", "b", "a"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=rows).logits
        for i, name in enumerate(rows):
            alone = model(**_row(inputs, i), adapter_names=[name]).logits[0]
            assert (mixed[i] - alone).abs().max() <= TOL, (i, name)


def test_a_composition_with_a_prefix_is_refused():
    composition = pytest.importorskip("adapterkit.composition")
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=3))
    model.add_adapter("l", AdapterConfig("lora"))
    inputs = tiny_inputs("llama", batch=2)
    with torch.no_grad(), pytest.raises(ValueError, match="cannot be composed"):
        model(**inputs, adapter_names=[composition.Stack("p", "l"), "p"])


def test_deep_copy_and_detach():
    import copy

    model = AdapterModel(tiny_model("gpt2"))
    model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=3, init_std=0.5))
    inputs = tiny_inputs("gpt2", batch=2)
    with torch.no_grad():
        want = model(**inputs, adapter_names="p").logits
        clone = copy.deepcopy(model)
        bare = model.detach()
        assert not bare.transformer._forward_pre_hooks  # the backbone pre-hook came off
        assert torch.equal(bare(**inputs).logits, clone.base(**inputs).logits)
        assert not torch.allclose(bare(**inputs).logits, want)
        assert torch.equal(clone(**inputs, adapter_names="p").logits, want)  # the copy hooks its own backbone
