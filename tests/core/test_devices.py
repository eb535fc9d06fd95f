"""Every kind on every device and dtype the machine has: CPU always, CUDA where present; float32 and the
half-precision bases users serve (bfloat16, float16).

In float32 the equalities are the suite's usual ones (each mixed row == that row alone, <= 1e-5). In
half precision a batch and a single row run different kernels, so they round differently even on the
bare model; there the claim is that mixing costs no precision: each mixed row is no further from the
float32 answer (same weights) than the same row run alone in that dtype is, up to a small factor.
On a machine without CUDA the CUDA cases are skipped; CI has none, a lent GPU machine runs them
(scripts/device-check.sh).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tinymodels import tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device here"))]
HALF = [torch.bfloat16, torch.float16]
TOL = 1e-5

ALL = ["q", "k", "v", "o", "up", "down"]
CONFIGS = {
    "houlsby": AdapterConfig("houlsby", bottleneck_size=6),
    "pfeiffer": AdapterConfig("pfeiffer", bottleneck_size=4),
    "parallel": AdapterConfig("parallel", bottleneck_size=5),
    "lora8": AdapterConfig("lora", bottleneck_size=8, alpha=16),
    "lora64": AdapterConfig("lora", bottleneck_size=64, targets=ALL, rslora=True),
    "dora": AdapterConfig("lora", bottleneck_size=4, targets=ALL, dora=True),
    "ia3": AdapterConfig("ia3"),
}
ROWS = ["lora8", "houlsby", None, "ia3", "prefix4", "dora", "lora64", "pfeiffer", "parallel", "prefix7"]
MODEL_TYPES = ["bert", "gpt2", "llama", "t5", "bart"]


def _build(model_type: str, device: str, dtype: torch.dtype, seed: int = 0) -> AdapterModel:
    """A tiny base in ``dtype`` on ``device``, every kind added (on the base's device and dtype), and
    moved far from the identity so that a wrong route shows."""
    model = AdapterModel(tiny_model(model_type, seed=seed).to(device=device, dtype=dtype))
    configs = CONFIGS | {"prefix4": AdapterConfig("prefix", bottleneck_size=4, init_std=0.5),
                         "prefix7": AdapterConfig("prefix", bottleneck_size=7, init_std=0.5)}
    for name, config in configs.items():
        model.add_adapter(name, copy.deepcopy(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            assert p.device.type == device and p.dtype == dtype, name  # adapters follow the base
            noise = torch.randn(p.shape, generator=g) * (0.05 if name.endswith("magnitude") else 0.2)
            p.add_(noise.to(device=device, dtype=dtype))
    return model.eval()


def _inputs(model_type: str, batch: int, device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tiny_inputs(model_type, batch=batch).items()}


def _row(inputs: dict, i: int) -> dict:
    """Row i alone, without its (right) padding."""
    row = {k: v[i : i + 1] for k, v in inputs.items()}
    n = int(row["attention_mask"].sum())
    return {k: (v[:, :n] if k in ("input_ids", "attention_mask") else v) for k, v in row.items()}


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return (logits if logits is not None else output.last_hidden_state).float()


def _rows(model: AdapterModel, inputs: dict, names: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The mixed batch's output and each row run alone (unpadded), in float32."""
    with torch.no_grad():
        mixed = _out(model(**inputs, adapter_names=names))
        alone = [_out(model(**_row(inputs, i), adapter_names=[n]))[0] for i, n in enumerate(names)]
    return mixed, alone


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_kinds_float32_rows_equal_alone(model_type, device):
    """Every kind in one float32 batch on this device: each row == alone."""
    model = _build(model_type, device, torch.float32)
    names = ROWS
    inputs = _inputs(model_type, len(names), device)
    mixed, alone = _rows(model, inputs, names)
    assert mixed.device.type == device
    for i, (name, a) in enumerate(zip(names, alone)):
        diff = (mixed[i, : a.shape[0]] - a).abs().max().item()
        assert diff <= TOL, (model_type, device, name, diff)
    with torch.no_grad():  # and every adapter acts: its row differs from the bare base's
        bare = _out(model(**inputs, adapter_names=None))
    for i, name in enumerate(names):
        n = alone[i].shape[0]
        assert ((mixed[i, :n] - bare[i, :n]).abs().max() > 1e-3) == (name is not None), (model_type, name)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_kinds_half_precision_cost_no_precision(model_type, device, dtype):
    """On a half-precision base, each mixed row is about as close to the float32 answer (the same
    weights in float32) as that row run alone in half precision is."""
    half = _build(model_type, device, dtype)
    full = copy.deepcopy(half).to(torch.float32)
    names = ROWS
    inputs = _inputs(model_type, len(names), device)
    mixed, alone = _rows(half, inputs, names)
    _, reference = _rows(full, inputs, names)
    assert torch.isfinite(mixed).all()
    scale = max(r.abs().max().item() for r in reference)
    floor = 4 * torch.finfo(dtype).eps * scale  # a few units in the last place of the largest output
    err_alone = max((a - r).abs().max().item() for a, r in zip(alone, reference))
    for i, (name, r) in enumerate(zip(names, reference)):
        err_mixed = (mixed[i, : r.shape[0]] - r).abs().max().item()
        assert err_mixed <= 2 * err_alone + floor, (model_type, device, dtype, name, err_mixed, err_alone)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "t5", "bart"])
@pytest.mark.parametrize("device", DEVICES)
def test_generate_mixed_kinds_on_device(model_type, device):
    """Greedy and beam search with rows of every kind on this device: each row's tokens == alone."""
    model = _build(model_type, device, torch.float32)
    names = ROWS[:6]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (len(names), 6), generator=g).to(device)
    mask = torch.ones_like(ids)
    decoder = model_type in ("llama", "gpt2")
    for i in range(len(names)):  # decoders pad on the left, encoder-decoders on the right
        pad = (i % 3) * 2
        if pad:
            sl = slice(0, pad) if decoder else slice(6 - pad, 6)
            ids[i, sl], mask[i, sl] = 0, 0
    for beams in (1, 3):
        kw = dict(max_new_tokens=4, do_sample=False, num_beams=beams, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
            assert out.device.type == device
            for i, name in enumerate(names):
                keep = mask[i].bool()
                one = model.generate(input_ids=ids[i : i + 1, keep], attention_mask=mask[i : i + 1, keep],
                                     adapter_names=[name], **kw)
                new_mixed = out[i, ids.shape[1] :] if decoder else out[i]
                new_alone = one[0, int(keep.sum()) :] if decoder else one[0]
                n = min(len(new_mixed), len(new_alone))
                assert torch.equal(new_mixed[:n], new_alone[:n]), (model_type, device, beams, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_merge_unmerge_on_device(device, dtype):
    """LoRA, DoRA and IA3 merged into a base on this device and dtype: outputs as unmerged (within the
    dtype's rounding), and unmerging restores every base tensor bit for bit."""
    model = _build("llama", device, dtype)
    inputs = _inputs("llama", 4, device)
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    tol = TOL if dtype == torch.float32 else 0.1
    for name in ("lora8", "dora", "ia3"):
        with torch.no_grad():
            unmerged = _out(model(**inputs, adapter_names=name))
            model.merge_adapter(name)
            merged = _out(model(**inputs, adapter_names=None))
            assert (merged - unmerged).abs().max().item() <= tol * max(1.0, unmerged.abs().max().item()), name
            model.unmerge_adapter(name)
        after = model.base.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name


@pytest.mark.parametrize("device", DEVICES)
def test_artifacts_move_between_devices_and_dtypes(tmp_path, device):
    """Saved on this device in bfloat16, loaded on the CPU in float32 and back: the same weights (the
    file is device-free), and the loaded adapter lands on its model's device and dtype."""
    model = _build("bert", device, torch.bfloat16)
    for name in ("houlsby", "lora8", "dora", "ia3"):
        path = model.save_adapter(name, tmp_path / f"{name}.safetensors")
        cpu = AdapterModel(tiny_model("bert"))
        cpu.load_adapter(path)
        for (k, a), (k2, b) in zip(model.adapters[name].state_dict().items(), cpu.adapters[name].state_dict().items()):
            assert k == k2 and b.device.type == "cpu" and b.dtype == torch.float32
            assert torch.equal(a.float().cpu(), b), (name, k)
        back = AdapterModel(tiny_model("bert").to(device=device, dtype=torch.bfloat16))
        back.load_adapter(cpu.save_adapter(name, tmp_path / f"{name}-cpu.safetensors"))
        for k, v in back.adapters[name].state_dict().items():
            assert v.device.type == device and v.dtype == torch.bfloat16
            assert torch.equal(v, model.adapters[name].state_dict()[k]), (name, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_steps_on_device(device, dtype):
    """A few AdamW steps of a mixed-kinds batch on this device: only adapters change, the loss falls."""
    model = _build("llama", device, dtype)
    names = ["lora8", "houlsby", "dora", "ia3", "prefix4"]
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.adapters.named_parameters() if n.split(".")[0] in names]
    for p in params:
        p.requires_grad_(True)
    base = {k: v.clone() for k, v in model.base.state_dict().items()}
    inputs = _inputs("llama", len(names), device)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(**inputs, adapter_names=names, labels=inputs["input_ids"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(torch.equal(base[k], v) for k, v in model.base.state_dict().items())
