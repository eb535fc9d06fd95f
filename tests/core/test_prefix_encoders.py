"""Prefix tuning on encoders and encoder-decoders (``kinds/prefix.py``: a pre-hook on each layer's
self-attention hands it a one-layer cache view and a widened mask), and the reparameterisation MLP
(``prefix_projection``) on a decoder, an encoder and an encoder-decoder.

The maths against references built by hand (BERT: transformers' own cache argument; T5 and BART: every
self-attention given a ``DynamicCache`` holding its prefix and a mask made here), per-row mixing with
other kinds and no adapter in forward (with and without autograd) and ``generate`` (greedy, beams),
exact masking of padded prefix columns, eager == sdpa, training, refusals, and folding the MLP into
plain prefixes for artifacts. Runs under whichever transformers the venv has (4.57 or 5.x).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tinymodels import TINY, tiny_inputs, tiny_model, train_steps
from transformers import AutoConfig, DynamicCache

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.artifact import read_artifact, read_header
from adapterkit.kinds.prefix import ENCODER_DECODERS, ENCODERS, REFUSED

TOL = 1e-5
CONFIGS = {
    "p4": AdapterConfig("prefix", bottleneck_size=4, init_std=0.5),
    "p7": AdapterConfig("prefix", bottleneck_size=7, init_std=0.5),
    "lora": AdapterConfig("lora", bottleneck_size=4, targets=["q", "v", "down"]),
    "houlsby": AdapterConfig("houlsby", bottleneck_size=5),
    "ia3": AdapterConfig("ia3"),
}
ROWS = ["p4", "p7", None, "lora", "houlsby", "ia3", "p4"]


def _tiny(model_type: str, seed: int = 0, **overrides):
    """``tiny_model`` with config overrides (attention implementation, dropout)."""
    if not overrides:
        return tiny_model(model_type, seed=seed)
    kwargs, auto = TINY[model_type]
    attn = overrides.pop("attn_implementation", None)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    return auto.from_config(config, **({"attn_implementation": attn} if attn else {})).eval()


def _build(model_type: str, seed: int = 0, configs: dict | None = None, **overrides) -> AdapterModel:
    model = AdapterModel(_tiny(model_type, seed, **overrides))
    for name, config in (configs or CONFIGS).items():
        model.add_adapter(name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA's B, IA3's ones and the bottlenecks start at the identity: move them
        for name, p in model.adapters.named_parameters():
            if not name.startswith("p"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _seq2seq(model_type: str) -> bool:
    return model_type in ENCODER_DECODERS


def _row(inputs: dict, i: int) -> dict:
    """Row i alone, its encoder input without its (right) padding."""
    n = int(inputs["attention_mask"][i].sum())
    return {k: v[i : i + 1, :n] if k in ("input_ids", "attention_mask") else v[i : i + 1] for k, v in inputs.items()}


def _outputs(out, model_type: str, real: torch.Tensor) -> list[torch.Tensor]:
    """What a row's result is: the encoder's states at its real tokens (B, T_real, d) and, for an
    encoder-decoder, the decoder's logits (B, T_dec, V)."""
    if _seq2seq(model_type):
        return [out.encoder_last_hidden_state[:, : real.shape[-1]][:, real[0]], out.logits]
    return [out.last_hidden_state[:, : real.shape[-1]][:, real[0]]]


def _attention_of(base, ls):
    return base.get_submodule(f"{ls.path}.{ls.names['attn_v'].rpartition('.')[0]}")


def _params(module) -> set:
    return set(inspect.signature(type(module).forward).parameters)


# -- the maths --------------------------------------------------------------------------------------


def test_bert_equals_transformers_own_cache_argument():
    """BERT's model forward takes a cache even as an encoder: the bare model, a DynamicCache holding the
    prefix, a mask of ones over it and position ids from 0 == the prefix adapter (right-padded batch)."""
    model = AdapterModel(tiny_model("bert"))
    a = model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=4, init_std=0.5))
    inputs = tiny_inputs("bert", batch=4)
    n, t = inputs["input_ids"].shape
    cache = DynamicCache()
    for i, layer in enumerate(a.layers):  # 4 heads of 8
        k, v = (p.detach()[None].expand(n, -1, -1).reshape(n, 4, 4, 8).transpose(1, 2) for p in layer.prefix.prefix())
        cache.update(k, v, i)
    arg = "cache" if "cache" in _params(model.base) else "past_key_values"
    mask = torch.cat([torch.ones(n, 4, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        reference = model.base(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=torch.arange(t)[None],
                               **{arg: cache}).last_hidden_state
        ours = model(**inputs, adapter_names="p").last_hidden_state
        bare = model.base(**inputs).last_hidden_state
        unrouted = model(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    assert (ours - reference)[real].abs().max() <= 1e-6
    assert (ours - bare)[real].abs().max() > 1e-2  # the prefix acts
    assert torch.equal(unrouted, bare)


def _by_hand(model: AdapterModel, adapter, decoder_mask_len: int) -> list:
    """Pre-hooks on the bare model's self-attention modules: each gets a transformers ``DynamicCache``
    holding its layer's prefix, and a float mask built here from the 2-D mask (prefix columns open, the
    decoder causal); 4.57's cache position starts after the prefix."""
    base, handles, masks = model.base, [], {}

    def hook_for(key: torch.Tensor, value: torch.Tensor):
        p = key.shape[0]

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            n, t = x.shape[:2]
            d = getattr(module, "key_value_proj_dim", None) or getattr(module, "head_dim", None)
            cache = DynamicCache()
            cache.update(*(w[None].expand(n, -1, -1).reshape(n, p, -1, d).transpose(1, 2) for w in (key, value)),
                         module.layer_idx)
            names = _params(module)
            if getattr(module, "is_causal", False) or getattr(module, "is_decoder", False):
                tokens = torch.arange(t)[:, None] >= torch.arange(t)[None]  # (T, T) causal
                allowed = torch.cat([torch.ones(t, p, dtype=torch.bool), tokens], dim=1)[None, None].expand(n, 1, t, p + t)
            else:
                real = masks["encoder"].bool()
                allowed = torch.cat([torch.ones(n, p, dtype=torch.bool), real], dim=1)[:, None, None]
            mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
            kwargs = dict(kwargs)
            kwargs["cache" if "cache" in names else "past_key_values"] = cache
            kwargs["attention_mask" if "attention_mask" in names else "mask"] = mask
            if "cache_position" in names:
                kwargs["cache_position"] = torch.arange(p, p + t)
            return args, kwargs

        return hook

    for ls in model.layer_sites:
        k, v = (w.detach() for w in adapter.layers[ls.index].prefix.prefix())
        handles.append(_attention_of(base, ls).register_forward_pre_hook(hook_for(k, v), with_kwargs=True))
    return handles, masks


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_encoder_decoder_equals_prefixes_injected_by_hand(model_type):
    """Every self-attention (encoder and decoder) of the bare model given a DynamicCache with its prefix
    and a mask made by hand == the prefix adapter; T5's relative position bias included (the prefix
    columns before the input, the queries at P + i)."""
    model = AdapterModel(tiny_model(model_type))
    a = model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=4, init_std=0.5))
    inputs = tiny_inputs(model_type, batch=4)
    handles, masks = _by_hand(model, a, inputs["decoder_input_ids"].shape[1])
    masks["encoder"] = inputs["attention_mask"]
    try:
        with torch.no_grad():
            reference = model.base(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        ours = model(**inputs, adapter_names="p", use_cache=False)
        bare = model.base(**inputs, use_cache=False)
    real = inputs["attention_mask"].bool()
    enc = (ours.encoder_last_hidden_state - reference.encoder_last_hidden_state)[real].abs().max()
    assert enc <= 1e-6 and (ours.logits - reference.logits).abs().max() <= 1e-6
    assert (ours.logits - bare.logits).abs().max() > 1e-3  # (BART's tiny logits are small)


# -- mixing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("model_type", [*ENCODERS, *ENCODER_DECODERS])
def test_mixed_rows_forward_equal_each_row_alone(model_type, grad):
    """Prefixes of lengths 4 and 7, no adapter, LoRA, a bottleneck and IA3 in one right-padded batch:
    each row equals that row alone (unpadded), from the model's stacks and stacked afresh under
    autograd; every row with an adapter differs from the bare model."""
    model = _build(model_type)
    inputs = tiny_inputs(model_type, batch=len(ROWS))
    with torch.set_grad_enabled(grad):
        mixed = model(**inputs, adapter_names=ROWS)
        for i, name in enumerate(ROWS):
            row = _row(inputs, i)
            real = row["attention_mask"].bool()
            alone = _outputs(model(**row, adapter_names=[name]), model_type, real)
            bare = _outputs(model.base(**row), model_type, real)
            for got, want in zip(_outputs(mixed, model_type, real), alone):
                assert (got[i] - want[0]).abs().max() <= TOL, (i, name)
            assert ((alone[-1] - bare[-1]).abs().max() > 1e-3) == (name is not None), (i, name)


def _generate_kw(model_type: str, num_beams: int) -> dict:
    return dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, output_scores=True, return_dict_in_generate=True,
                pad_token_id=TINY[model_type][0]["pad_token_id"])


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_mixed_rows_generate_equal_each_row_alone(model_type, num_beams):
    """``generate`` on a right-padded batch of mixed rows: each row's tokens and every step's scores
    equal that row generated alone; greedy steps equal a forward over the answer so far (the decoder's
    real cache continues without ever holding the prefix)."""
    model = _build(model_type)
    inputs = {k: v for k, v in tiny_inputs(model_type, batch=len(ROWS)).items() if k != "decoder_input_ids"}
    kw = _generate_kw(model_type, num_beams)
    mixed = model.generate(**inputs, adapter_names=ROWS, **kw)
    bare = model.generate(**inputs, adapter_names=[None] * len(ROWS), **kw)
    for i, name in enumerate(ROWS):
        k = num_beams  # each row's beams are consecutive
        first = (mixed.scores[0][i * k : (i + 1) * k] - bare.scores[0][i * k : (i + 1) * k]).abs().max()
        assert (first > 1e-3) == (name is not None), (i, name)  # every adapter acts from the first step
        alone = model.generate(**_row(inputs, i), adapter_names=[name], **kw)
        new = alone.sequences[0]
        assert torch.equal(mixed.sequences[i, : len(new)], new), (i, name)
        for step_mixed, step_alone in zip(mixed.scores, alone.scores):
            assert (step_mixed[i * k : (i + 1) * k] - step_alone).abs().max() <= TOL, (i, name)
    if num_beams == 1:
        logits = model.generate(**inputs, adapter_names=ROWS, **{**kw, "output_logits": True}).logits
        for i, name in enumerate(ROWS):
            for s in range(len(logits)):
                answer = mixed.sequences[i : i + 1, : s + 1]
                full = model(**_row(inputs, i), decoder_input_ids=answer, adapter_names=[name]).logits[0, -1]
                assert (logits[s][i] - full).abs().max() <= TOL, (i, name, s)


# -- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "t5", "bart"])
def test_padded_prefix_columns_get_exactly_zero_attention(model_type):
    """Eager attention's probabilities (B, H, T, P_max + T): a row's zero-padded prefix columns (before
    its own, left padding) and every prefix column of a row without a prefix get exactly 0, its own
    prefix columns more; padding tokens stay at exactly 0 too."""
    model = _build(model_type, attn_implementation="eager")
    rows = ["p4", "p7", None, "p4"]
    inputs = tiny_inputs(model_type, batch=len(rows))
    with torch.no_grad():
        out = model(**inputs, adapter_names=rows, output_attentions=True)
    stacks = [("encoder", out.encoder_attentions, inputs["attention_mask"]),
              ("decoder", out.decoder_attentions, torch.ones_like(inputs["decoder_input_ids"]))] \
        if _seq2seq(model_type) else [("encoder", out.attentions, inputs["attention_mask"])]
    for where, attentions, mask in stacks:
        for layer, probs in enumerate(attentions):
            assert probs.shape[-1] == 7 + mask.shape[1], (where, layer)
            for i, name in enumerate(rows):
                own = {"p4": 4, "p7": 7, None: 0}[name]
                real = mask[i].bool()
                q = probs[i][:, real]  # (H, T_real, 7 + T): real queries
                assert torch.equal(q[..., : 7 - own], torch.zeros_like(q[..., : 7 - own])), (where, layer, i)
                assert (q[..., 7 - own : 7] > 0).all(), (where, layer, i)
                keys = q[..., 7:]
                assert torch.equal(keys[..., ~real], torch.zeros_like(keys[..., ~real])), (where, layer, i)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("model_type", ["bert", "t5", "bart"])
def test_eager_and_sdpa_agree(model_type, padded):
    """The widened mask in each form the model passes (eager: additive floats; sdpa: booleans, or none
    at all without padding, when the hook builds one, causal in decoders) gives the same mixed batch."""
    inputs = tiny_inputs(model_type, batch=len(ROWS))
    if not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    try:
        models = [_build(model_type, attn_implementation=attn) for attn in ("eager", "sdpa")]
    except ValueError as e:  # transformers 4.57's T5 has no sdpa
        pytest.skip(str(e).splitlines()[0])
    whole = torch.ones(1, inputs["input_ids"].shape[1], dtype=torch.bool)
    with torch.no_grad():
        eager, sdpa = (_outputs(m(**inputs, adapter_names=ROWS), model_type, whole) for m in models)
    real = inputs["attention_mask"].bool()
    assert (eager[0] - sdpa[0])[real].abs().max() <= TOL
    if _seq2seq(model_type):
        assert (eager[1] - sdpa[1]).abs().max() <= TOL


# -- training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "t5"])
def test_gradients_mixed_equal_alone_and_checkpointing_keeps_them(model_type):
    """Under autograd each adapter's gradient from a mixed batch is the sum of its rows' alone; with
    gradient checkpointing in training (no cache to lose here) the gradients are the same."""
    model = _build(model_type, seed=1, **({"dropout_rate": 0.0} if model_type == "t5" else
                                         {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    inputs = tiny_inputs(model_type, batch=len(ROWS))
    params = dict(model.adapters.named_parameters())

    def grads(rows_alone: bool) -> dict:
        model.zero_grad()
        if rows_alone:
            for i, name in enumerate(ROWS):
                row = _row(inputs, i)
                outs = _outputs(model(**row, adapter_names=[name]), model_type, row["attention_mask"].bool())
                sum(t.sum() for t in outs).backward()
        else:
            real = inputs["attention_mask"].bool()
            out = model(**inputs, adapter_names=ROWS)
            parts = [out.encoder_last_hidden_state[real], out.logits] if _seq2seq(model_type) else [out.last_hidden_state[real]]
            sum(t.sum() for t in parts).backward()
        return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    from_mixed, from_alone = grads(False), grads(True)
    assert set(from_mixed) == set(from_alone) and {n.split(".")[0] for n in from_alone} == set(CONFIGS)
    for n in from_alone:
        torch.testing.assert_close(from_mixed[n], from_alone[n], atol=1e-4, rtol=1e-4, msg=n)
    model.train()
    plain = grads(False)
    model.gradient_checkpointing_enable()
    checkpointed = grads(False)
    assert set(plain) == set(checkpointed)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=TOL, rtol=1e-5, msg=n)  # recomputed: rounding


def test_seq2seq_training_moves_only_the_prefix_and_lowers_the_loss():
    model = _build("t5", seed=2)
    inputs = tiny_inputs("t5", batch=4)
    batch = {**{k: v for k, v in inputs.items() if k != "decoder_input_ids"}, "labels": inputs["decoder_input_ids"]}
    report = model.train_adapter("p4")
    assert report.trainable == sum(p.numel() for p in model.adapters["p4"].parameters()) == 2 * 4 * 4 * 32
    losses, before = train_steps(model, batch, "p4")
    assert losses[-1] < losses[0] - 0.05, losses
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {f"adapters.p4.layers.{i}.prefix.{w}" for i in range(4) for w in ("key", "value")}


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["distilbert", "deberta-v2", "albert", "mpnet", "modernbert", "vit", "longt5"])
def test_architectures_without_a_cache_argument_are_refused_with_the_reason(model_type):
    model = AdapterModel(tiny_model(model_type))
    with pytest.raises(ValueError, match=f"does not support '{model_type}': its"):
        model.add_adapter("p", AdapterConfig("prefix"))
    assert model.list_adapters() == [] and "prefix" not in model._attachment.hooked
    assert model_type in REFUSED


def test_other_refusals_on_encoders():
    model = AdapterModel(_tiny("bert", is_decoder=True))
    with pytest.raises(ValueError, match="is_decoder=True"):
        model.add_adapter("p", AdapterConfig("prefix"))
    if "position_embedding_type" in inspect.signature(type(AutoConfig.for_model("bert")).__init__).parameters:
        model = AdapterModel(_tiny("bert", position_embedding_type="relative_key"))  # 4.57 only
        with pytest.raises(ValueError, match="absolute position embeddings"):
            model.add_adapter("p", AdapterConfig("prefix"))
    model = AdapterModel(tiny_model("bart"))
    model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=2))
    model.base.config._attn_implementation = "flash_attention_2"  # (as if loaded so: its masks are not 4-D)
    with torch.no_grad(), pytest.raises(ValueError, match="eager or sdpa"):
        model(**tiny_inputs("bart", batch=2), adapter_names="p")


# -- the reparameterisation MLP ---------------------------------------------------------------------


def test_projection_config_options():
    config = AdapterConfig("prefix", prefix_projection=True)
    assert (config.prefix_projection, config.prefix_hidden_size) == (True, 512)
    assert {k: config.to_dict()[k] for k in ("prefix_projection", "prefix_hidden_size")} == {
        "prefix_projection": True, "prefix_hidden_size": 512}
    assert "prefix_projection" not in AdapterConfig("prefix").to_dict()
    assert AdapterConfig.from_dict(config.to_dict()) == config
    for bad, match in ((dict(kind="lora", prefix_projection=True), "prefix-tuning options"),
                       (dict(kind="houlsby", prefix_hidden_size=8), "prefix-tuning options"),
                       (dict(kind="prefix", prefix_hidden_size=8), "give prefix_projection=True"),
                       (dict(kind="prefix", prefix_projection=True, prefix_hidden_size=0), "positive integer"),
                       (dict(kind="prefix", prefix_projection="yes"), "True or False")):
        with pytest.raises(ValueError, match=match):
            AdapterConfig(**bad)


MLP = AdapterConfig("prefix", bottleneck_size=5, prefix_projection=True, prefix_hidden_size=16)


def _projected(model_type: str, seed: int = 0, **head) -> AdapterModel:
    """The usual adapters and ``mlp``, a prefix trained through the MLP (P = 5, width 16)."""
    model = _build(model_type, seed=seed)
    model.add_adapter("mlp", MLP, **head)
    return model


def _logits(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("model_type", ["llama", "bert", "t5"])
def test_projection_shapes_fold_save_load(model_type, tmp_path):
    """One MLP for every layer (the first layer holds its input stage); the artifact holds the folded
    prefixes and loads as a plain prefix adapter giving the same outputs; a resumable save keeps the
    MLP; loading plain prefixes into the MLP form folds it in place."""
    model = _projected(model_type)
    a = model.adapters["mlp"]
    kv = model.layer_sites[0].dims("attn_v")[1]
    layers = model.num_layers
    shapes = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    want = {"layers.0.prefix.embedding": (5, model.hidden_size), "layers.0.prefix.down.weight": (16, model.hidden_size),
            "layers.0.prefix.down.bias": (16,)}
    want |= {f"layers.{i}.prefix.up.{w}": s for i in range(layers) for w, s in (("weight", (2 * kv, 16)), ("bias", (2 * kv,)))}
    assert shapes == want
    inputs = tiny_inputs(model_type, batch=3)
    with torch.no_grad():
        projected = _logits(model(**inputs, adapter_names="mlp"))
    path = model.save_adapter("mlp", tmp_path / "mlp.safetensors")
    header = read_header(path)
    assert {k: t.shape for k, t in header.tensors.items()} == {f"layers.{i}.prefix.{w}": (5, kv) for i in range(layers) for w in ("key", "value")}
    meta = read_artifact(path).metadata
    assert "prefix_projection" not in meta["config"] and meta["trained_with"] == {"prefix_projection": True, "prefix_hidden_size": 16}
    model.load_adapter(path, name="folded")
    assert model.adapter_info("folded")["config"] == AdapterConfig("prefix", bottleneck_size=5, init_std=1e-2).to_dict()
    with torch.no_grad():
        assert (_logits(model(**inputs, adapter_names="folded")) - projected).abs().max() <= 1e-6
        assert (_logits(model.base(**inputs)) - projected).abs().max() > 1e-2
    assert a.config.prefix_projection  # saving did not change the adapter
    # resumable (training checkpoints): the MLP as it trains
    resumable = model.save_adapter("mlp", tmp_path / "resume.safetensors", resumable=True)
    assert set(read_header(resumable).tensors) == set(want)
    model.load_adapter(resumable, name="again")
    assert model.adapters["again"].config.prefix_projection
    with torch.no_grad():
        assert torch.equal(_logits(model(**inputs, adapter_names="again")), projected)
    # plain prefixes into the MLP form (a run's best artifact restored after training): folded first
    config = a.config
    a.load_state_dict(read_artifact(path).tensors)
    assert not a.config.prefix_projection and config.prefix_projection  # a new config; the old object as it was
    assert set(a.state_dict()) == set(header.tensors)
    with torch.no_grad():
        assert (_logits(model(**inputs, adapter_names="mlp")) - projected).abs().max() <= 1e-6


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "bert", "t5"])
def test_projection_rows_mix_with_every_kind(model_type, grad):
    model = _projected(model_type)
    rows = ["mlp", "p7", None, "lora", "mlp", "ia3"]
    inputs = tiny_inputs(model_type, batch=len(rows))
    with torch.set_grad_enabled(grad):
        mixed = model(**inputs, adapter_names=rows)
        for i, name in enumerate(rows):
            row = _row(inputs, i)
            if model_type == "llama":
                alone = model(**row, adapter_names=[name]).logits[0]
                assert (mixed.logits[i, : alone.shape[0]] - alone).abs().max() <= TOL, (i, name)
                continue
            real = row["attention_mask"].bool()
            for got, want in zip(_outputs(mixed, model_type, real), _outputs(model(**row, adapter_names=[name]), model_type, real)):
                assert (got[i] - want[0]).abs().max() <= TOL, (i, name)


@pytest.mark.parametrize("model_type", ["llama", "bert", "t5"])
def test_projection_trains_the_mlp_and_lowers_the_loss(model_type):
    head = {"head": "classification", "labels": ["x", "y"]} if model_type == "bert" else {}  # a loss to train
    model = _projected(model_type, seed=3, **head)
    report = model.train_adapter("mlp")
    a = model.adapters["mlp"]
    assert report.trainable == sum(p.numel() for p in a.parameters())
    inputs = tiny_inputs(model_type, batch=4)
    if model_type == "bert":
        batch = {**inputs, "labels": torch.tensor([0, 1, 1, 0])}
    elif model_type == "t5":
        batch = {**{k: v for k, v in inputs.items() if k != "decoder_input_ids"}, "labels": inputs["decoder_input_ids"]}
    else:
        batch = {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}
    mlp = {n for n, _ in a.named_parameters() if ".prefix." in n}

    def every_mlp_tensor_has_a_gradient(step: int) -> None:  # its input stage through every layer
        if step == 0:
            for n, p in a.named_parameters():
                if n in mlp:
                    assert p.grad is not None and p.grad.abs().sum() > 0, n

    losses, before = train_steps(model, batch, "mlp", lr=0.01, after_backward=every_mlp_tensor_has_a_gradient)
    assert losses[-1] < losses[0] - 0.02, losses
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in moved if ".prefix." in n} == {f"adapters.mlp.{n}" for n in mlp}
    assert all(n.startswith("adapters.mlp.") for n in moved)


def test_deep_copy_and_detach():
    """One pre-hook per layer's self-attention; a deep copy hooks (and links its MLP) on its own; detach
    leaves the bare model."""
    import copy

    model = AdapterModel(tiny_model("t5"))
    model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=3, init_std=0.5))
    model.add_adapter("mlp", MLP)
    hooked = [_attention_of(model.base, ls) for ls in model.layer_sites]
    assert [len(m._forward_pre_hooks) for m in hooked] == [1] * 4
    inputs = tiny_inputs("t5", batch=2)
    with torch.no_grad():
        want = model(**inputs, adapter_names=["p", "mlp"]).logits
        clone = copy.deepcopy(model)
        layers = clone.adapters["mlp"].layers
        assert all(la.prefix.__dict__["_root"] is layers[0].prefix for la in layers[1:])
        bare = model.detach()
        assert sum(len(m._forward_pre_hooks) for m in bare.modules()) == 0
        assert torch.equal(bare(**inputs).logits, clone.base(**inputs).logits)
        assert not torch.allclose(bare(**inputs).logits, want)
        assert torch.equal(clone(**inputs, adapter_names=["p", "mlp"]).logits, want)
