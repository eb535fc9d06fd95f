"""One batch, rows of different kinds and sizes: every row equals that row run alone (max abs diff <= 1e-5).

The table: LoRA of rank 8 on q, v and of rank 64 on every projection (ranks zero-padded in one batch),
a Houlsby bottleneck, IA3, prefix tuning (on every architecture that takes it: ``kinds/prefix.py``) and
no adapter, in one forward and in ``generate`` (greedy and beams), on every architecture of the site
table (forward), with gradients on and off, and with gradients reaching each row's own adapter exactly
as when the row runs alone.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import DECODERS, ENCODER_DECODERS, ENCODERS, tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel

TOL = 1e-5
CONFIGS = {
    "lora8": AdapterConfig("lora", bottleneck_size=8, alpha=16),
    "houlsby": AdapterConfig("houlsby", bottleneck_size=6),
    "ia3": AdapterConfig("ia3"),
    "lora64": AdapterConfig("lora", bottleneck_size=64, targets=["q", "k", "v", "o", "up", "down"], alpha=8, rslora=True),
    "lora2": AdapterConfig("lora", bottleneck_size=2, targets=["k", "o", "down"], dropout=0.1),
}
PREFIX = AdapterConfig("prefix", bottleneck_size=5, init_std=0.5)
ROWS = ["lora8", "houlsby", None, "ia3", "prefix", "lora64", "lora2"]  # "prefix" where the base takes one
# an encoder, decoders (fused Conv1D qkv; grouped-query attention; q, k, v interleaved per head in one
# fused projection; fused grouped-query qkv and [gate; up]) and encoder-decoders
REPRESENTATIVE = ["bert", "gpt2", "llama", "bloom", "phi3", "t5", "bart"]


def _build(model_type: str, seed: int = 0, configs: dict | None = None) -> AdapterModel:
    model = AdapterModel(tiny_model(model_type, seed=seed))
    for name, config in (configs or CONFIGS).items():
        model.add_adapter(name, config)
    if configs is None:
        try:
            model.add_adapter("prefix", PREFIX)
        except ValueError as e:  # architectures prefix tuning refuses, saying why
            assert "prefix tuning" in str(e), e
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from the identity (LoRA's B starts at zero), so mistakes show
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _rows(model: AdapterModel) -> list:
    """``ROWS``, without the prefix row where the base takes no prefix."""
    return [r for r in ROWS if r != "prefix" or r in model.adapters]


def _row(inputs: dict, i: int) -> dict:
    """Row i alone, without its (right) padding."""
    row = {k: v[i : i + 1] for k, v in inputs.items()}
    if "attention_mask" in row:
        n = int(row["attention_mask"].sum())
        row = {k: (v[:, :n] if k in ("input_ids", "attention_mask") else v) for k, v in row.items()}
    return row


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def _check_rows(model: AdapterModel, model_type: str, rows: list) -> None:
    inputs = tiny_inputs(model_type, batch=len(rows))
    mixed = _out(model(**inputs, adapter_names=rows))
    for i, name in enumerate(rows):
        alone = _out(model(**_row(inputs, i), adapter_names=[name]))
        n = alone.shape[1]
        diff = (mixed[i, :n] - alone[0]).abs().max().item()
        assert diff <= TOL, (model_type, i, name, diff)
    plain = _out(model.base(**_row(inputs, 2)))
    assert (mixed[2, : plain.shape[1]] - plain[0]).abs().max() <= TOL  # the None row is the bare base
    for i, name in enumerate(rows):  # and each adapter really acts on its row
        if name is not None:
            bare = _out(model(**_row(inputs, i), adapter_names=[None]))[0]
            assert (mixed[i, : bare.shape[0]] - bare).abs().max() > 1e-3, (model_type, name)


@pytest.mark.parametrize("model_type", ENCODERS + DECODERS + ENCODER_DECODERS)
def test_mixed_kinds_forward_every_architecture(model_type):
    model = _build(model_type)
    with torch.no_grad():
        _check_rows(model, model_type, _rows(model))


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_mixed_kinds_with_gradients(model_type):
    """Under autograd (weights stacked in the call's graph): outputs per row, and each adapter's
    gradient from the mixed batch equals the sum of its rows' gradients run alone."""
    model = _build(model_type, seed=1)
    rows = _rows(model)
    inputs = tiny_inputs(model_type, batch=len(rows))
    with torch.enable_grad():
        _check_rows(model, model_type, rows)
        params = {n: p for n, p in model.adapters.named_parameters()}
        model.zero_grad()
        mixed = _out(model(**inputs, adapter_names=rows))
        mask = inputs.get("attention_mask")
        weight = torch.ones(mixed.shape[:2]) if mask is None or model_type in ENCODER_DECODERS else mask.float()
        (mixed * weight[..., None]).sum().backward()
        from_mixed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        model.zero_grad()
        for i, name in enumerate(rows):
            _out(model(**_row(inputs, i), adapter_names=[name])).sum().backward()
        from_alone = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert set(from_mixed) == set(from_alone)
    assert {n.split(".")[0] for n in from_alone} == {n for n in rows if n is not None}  # every row's adapter learns
    for n in from_alone:
        torch.testing.assert_close(from_mixed[n], from_alone[n], atol=1e-4, rtol=1e-4, msg=n)


def _left_padded(batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad = (i % 3) * 2
        ids[i, :pad], mask[i, :pad] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_mixed_kinds_generate_decoder(model_type, num_beams):
    model = _build(model_type)
    rows = _rows(model)
    inputs = _left_padded(len(rows), seed=3)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    mixed = model.generate(**inputs, adapter_names=rows, **kw)
    width = inputs["input_ids"].shape[1]
    for i, name in enumerate(rows):
        pad = int((inputs["attention_mask"][i] == 0).sum())
        row = {k: v[i : i + 1, pad:] for k, v in inputs.items()}
        alone = model.generate(**row, adapter_names=[name], **kw)
        new = alone.sequences[0, row["input_ids"].shape[1]:]  # may stop early at EOS; the batch pads on
        assert torch.equal(mixed.sequences[i, width : width + len(new)], new), (i, name)
        for step_mixed, step_alone in zip(mixed.scores, alone.scores):
            k = num_beams  # each row's beams are consecutive
            assert (step_mixed[i * k : (i + 1) * k] - step_alone).abs().max() <= TOL, (i, name)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("model_type", ENCODER_DECODERS)
def test_mixed_kinds_generate_encoder_decoder(model_type, num_beams):
    model = _build(model_type)
    rows = _rows(model)
    inputs = {k: v for k, v in tiny_inputs(model_type, batch=len(rows)).items() if k != "decoder_input_ids"}
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, output_scores=True, return_dict_in_generate=True)
    mixed = model.generate(**inputs, adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        alone = model.generate(**_row(inputs, i), adapter_names=[name], **kw)
        n = alone.sequences.shape[1]
        assert torch.equal(mixed.sequences[i, :n], alone.sequences[0]), (model_type, i, name)
        for step_mixed, step_alone in zip(mixed.scores, alone.scores):
            k = num_beams
            assert (step_mixed[i * k : (i + 1) * k] - step_alone).abs().max() <= TOL, (i, name)
