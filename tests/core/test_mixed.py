"""Per-row routing: every row of a mixed batch equals that row run alone with its adapter active.

Adapters of every kind, bottleneck size and activation share one batch, with padding and attention
masks; checked for encoders (with per-row heads), decoders (forward and greedy generate with the KV
cache) and encoder-decoders, on every architecture of the site table.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import DECODERS, ENCODER_DECODERS, ENCODERS, tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel

TOL = 1e-5
CONFIGS = {
    "a": AdapterConfig("houlsby", reduction_factor=4),
    "b": AdapterConfig("pfeiffer", bottleneck_size=3, activation="relu"),
    "c": AdapterConfig("parallel", bottleneck_size=5, activation="tanh"),
    "d": AdapterConfig("houlsby", bottleneck_size=16, activation="silu", leave_out=[1]),
}
ROW_NAMES = ["a", "b", None, "c", "d", "a"]


def _randomise(model: AdapterModel, seed: int) -> None:
    """Move adapters far from the identity so that a routing mistake shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _build(model_type: str, seed: int, heads: bool) -> AdapterModel:
    model = AdapterModel(tiny_model(model_type, seed=seed))
    for i, (name, config) in enumerate(CONFIGS.items()):
        labels = [f"{name}{k}" for k in range(2 + i)] if heads else ()
        model.add_adapter(name, config, head="classification" if heads else None, labels=labels)
    _randomise(model, seed)
    return model.eval()


def _row(inputs: dict, i: int, trim: bool = True) -> dict:
    """Row i alone; with trim, without its padding (right-padded inputs)."""
    row = {k: v[i : i + 1] for k, v in inputs.items()}
    if trim and "attention_mask" in row:
        n = int(row["attention_mask"].sum())
        row = {k: (v[:, :n] if k in ("input_ids", "attention_mask") else v) for k, v in row.items()}
    return row


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_rows_with_heads(model_type, seed):
    model = _build(model_type, seed, heads=True)
    names = [n or "a" for n in ROW_NAMES]  # every row needs a head here
    inputs = tiny_inputs(model_type, batch=len(names), seed=seed)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names)
        for i, name in enumerate(names):
            alone = model(**_row(inputs, i), adapter_names=name)
            n = len(model.labels(name))
            assert mixed.logits.shape == (len(names), 5)
            assert (mixed.logits[i, :n] - alone.logits[0]).abs().max() <= TOL
            assert torch.isinf(mixed.logits[i, n:]).all() and (mixed.logits[i, n:] < 0).all()
        # The adapters really act: the same row through two different adapters differs.
        other = model(**_row(inputs, 0), adapter_names="d").logits[0, :2]
        assert (other - mixed.logits[0, :2]).abs().max() > 1e-3  # row 0 uses "a", not "d"


@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_hidden_states_with_none_rows(model_type):
    model = _build(model_type, 0, heads=False)
    inputs = tiny_inputs(model_type, batch=len(ROW_NAMES))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=ROW_NAMES).last_hidden_state
        for i, name in enumerate(ROW_NAMES):
            alone = model(**_row(inputs, i), adapter_names=[name]).last_hidden_state
            n = alone.shape[1]
            assert (mixed[i, :n] - alone[0]).abs().max() <= TOL, (model_type, i, name)
        plain = model.base(**_row(inputs, 2)).last_hidden_state
        assert (mixed[2, : plain.shape[1]] - plain[0]).abs().max() <= TOL  # None row = the bare base
        other = model(**_row(inputs, 0), adapter_names="b").last_hidden_state
        assert (other[0] - mixed[0, : other.shape[1]]).abs().max() > 1e-3  # row 0 uses "a", not "b"


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_forward_rows(model_type):
    model = _build(model_type, 0, heads=False)
    inputs = tiny_inputs(model_type, batch=len(ROW_NAMES))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=ROW_NAMES).logits
        for i, name in enumerate(ROW_NAMES):
            alone = model(**_row(inputs, i), adapter_names=[name]).logits
            assert (mixed[i, : alone.shape[1]] - alone[0]).abs().max() <= TOL, (model_type, i, name)


def _left_padded(batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad = (i % 3) * 2
        ids[i, :pad], mask[i, :pad] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_greedy_generate_rows(model_type):
    model = _build(model_type, 0, heads=False)
    inputs = _left_padded(len(ROW_NAMES), seed=3)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    mixed = model.generate(**inputs, adapter_names=ROW_NAMES, **kw)
    for i, name in enumerate(ROW_NAMES):
        pad = int((inputs["attention_mask"][i] == 0).sum())
        row = {k: v[i : i + 1, pad:] for k, v in inputs.items()}
        alone = model.generate(**row, adapter_names=[name], **kw)
        assert torch.equal(mixed.sequences[i, inputs["input_ids"].shape[1]:], alone.sequences[0, row["input_ids"].shape[1]:])
        for step_mixed, step_alone in zip(mixed.scores, alone.scores):
            assert (step_mixed[i] - step_alone[0]).abs().max() <= TOL


@pytest.mark.parametrize("model_type", ENCODER_DECODERS)
def test_encoder_decoder_rows(model_type):
    model = _build(model_type, 0, heads=False)
    inputs = tiny_inputs(model_type, batch=len(ROW_NAMES))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=ROW_NAMES).logits
        for i, name in enumerate(ROW_NAMES):
            alone = model(**_row(inputs, i), adapter_names=[name]).logits
            assert (mixed[i] - alone[0]).abs().max() <= TOL, (model_type, i, name)
    gen_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=1)
    batch_out = model.generate(**gen_inputs, adapter_names=ROW_NAMES, **kw)
    for i, name in enumerate(ROW_NAMES):
        alone = model.generate(**_row(gen_inputs, i), adapter_names=[name], **kw)
        n = alone.shape[1]
        assert torch.equal(batch_out[i, :n], alone[0]), (model_type, i, name)


def test_beam_search_expands_rows():
    model = _build("gpt2", 0, heads=False)
    inputs = _left_padded(3, seed=5)
    names = ["a", "c", None]
    kw = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    out = model.generate(**inputs, adapter_names=names, **kw)
    for i, name in enumerate(names):
        pad = int((inputs["attention_mask"][i] == 0).sum())
        row = {k: v[i : i + 1, pad:] for k, v in inputs.items()}
        alone = model.generate(**row, adapter_names=[name], **kw)
        assert torch.equal(out[i, inputs["input_ids"].shape[1]:], alone[0, row["input_ids"].shape[1]:])
