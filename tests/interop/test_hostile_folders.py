"""Hostile or broken foreign folders (PEFT's, written by hand; the adapters library's, exported by
adapterkit and then edited; neither library needed): every one is refused with an InteropError that says
why, before anything is allocated from a size it claims, and the model is left as it was."""

from __future__ import annotations

import json

import pytest
import torch
from allocations import AllocatedBytes
from safetensors.torch import save_file
from tinymodels import tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.interop import InteropError, export

MODULES = [f"encoder.layer.{i}.attention.self.query" for i in range(2)]  # tiny BERT: d 32, 2 layers


def _write(folder, config: dict | None = None, weights: dict | None = None, binary: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"], "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    weights = _weights() if weights is None else weights
    if binary:
        torch.save(weights, folder / "adapter_model.bin")
    else:
        save_file(weights, str(folder / "adapter_model.safetensors"))


def _weights(**replace: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in MODULES:
        out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        out[f"base_model.model.{m}.lora_B.weight"] = torch.randn(32, 4, generator=g)
    for short, t in replace.items():  # A0 / B0: layer 0's lora_A / lora_B
        out[f"base_model.model.{MODULES[0]}.lora_{short[0]}.weight"] = t
    return out


def test_the_hand_written_folder_itself_loads(tmp_path):
    """The baseline every case below breaks: it loads, and changes the outputs."""
    _write(tmp_path / "p")
    model = AdapterModel(tiny_model("bert")).eval()
    model.load_adapter(tmp_path / "p", name="a")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        bare = model(**inputs).last_hidden_state
        adapted = model(**inputs, adapter_names="a").last_hidden_state
    assert not torch.allclose(bare, adapted, atol=1e-3)


CASES = {
    "B's rank differs from A's": ({}, _weights(B0=torch.randn(32, 3)), "lora_B"),
    "A is 1-D": ({}, _weights(A0=torch.randn(32)), "lora_A"),
    "rank 0": ({}, _weights(A0=torch.zeros(0, 32), B0=torch.zeros(32, 0)), "1 <= r"),
    # zero-byte tensors whose shapes claim a rank of 2**28, or (under the cap) rows over no inputs
    "a huge claimed rank": ({}, _weights(A0=torch.zeros(2**28, 0), B0=torch.zeros(0, 2**28)), "1 <= r"),
    "rows over no inputs": ({}, _weights(A0=torch.zeros(8000, 0), B0=torch.zeros(0, 8000)), "do not fit"),
    "A for another width": ({}, _weights(A0=torch.randn(4, 31)), "do not fit"),
    "integer weights": ({}, _weights(A0=torch.ones(4, 32, dtype=torch.int64)), "floating-point"),
    "complex weights": ({}, _weights(A0=torch.ones(4, 32, dtype=torch.complex64)), "floating-point"),
    "NaN in B": ({}, _weights(B0=torch.full((32, 4), float("nan"))), "not finite"),
    "float64 beyond float32": ({}, _weights(B0=torch.full((32, 4), 1e300, dtype=torch.float64)), "not finite"),
    "infinite alpha": ({"lora_alpha": float("inf")}, None, "lora_alpha"),
    "alpha as a list": ({"lora_alpha": [8]}, None, "lora_alpha"),
    "alpha as a bool": ({"lora_alpha": True}, None, "lora_alpha"),
    "use_rslora as a string": ({"use_rslora": "no"}, None, "use_rslora"),
    "dropout of 2": ({"lora_dropout": 2}, None, "lora_dropout"),
    "a broken pattern": ({"alpha_pattern": {"(": 4}}, None, "regular expression"),
    "patterns as a list": ({"alpha_pattern": ["query"]}, None, "pattern"),
    "a zero alpha in a pattern": ({"alpha_pattern": {"query": 0}}, None, "alpha_pattern"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_lora_folder_is_refused_and_leaves_the_model_as_it_was(tmp_path, case):
    config, weights, message = CASES[case]
    _write(tmp_path / "p", config, weights)
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("keep")
    with AllocatedBytes() as allocated, pytest.raises(InteropError, match=message):
        model.load_adapter(tmp_path / "p", name="x")
    assert allocated.bytes < 1 << 20  # nothing allocated from a claimed size (2**28 rows would be GBs)
    assert model.list_adapters() == ["keep"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("binary", [False, True])
def test_an_unreadable_weights_file_is_an_interop_error(tmp_path, damage, binary):
    _write(tmp_path / "p", binary=binary)
    path = tmp_path / "p" / ("adapter_model.bin" if binary else "adapter_model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    model = AdapterModel(tiny_model("bert"))
    with pytest.raises(InteropError, match="not a readable|not a pickle of plain tensors"):
        model.load_adapter(tmp_path / "p", name="x")
    assert model.list_adapters() == []


def test_a_bin_with_a_non_string_key_is_refused(tmp_path):
    weights = _weights()
    weights[7] = torch.ones(2)
    _write(tmp_path / "p", weights=weights, binary=True)
    with pytest.raises(InteropError, match="named tensors"):
        AdapterModel(tiny_model("bert")).load_adapter(tmp_path / "p", name="x")


def _adapters_folder(tmp_path, edit_config=None, edit_weights=None):
    """An adapters-library folder of a Houlsby adapter (bottleneck 4), optionally edited."""
    from safetensors.torch import load_file

    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("h", AdapterConfig("houlsby", bottleneck_size=4))
    folder = export(model, "h", tmp_path / "ad", to="adapters")
    if edit_config:
        meta = json.loads((folder / "adapter_config.json").read_text())
        edit_config(meta["config"])
        (folder / "adapter_config.json").write_text(json.dumps(meta))
    if edit_weights:
        path = folder / "adapter.safetensors"
        weights = load_file(str(path))
        edit_weights(weights)
        save_file(weights, str(path))
    return folder


def _first(weights: dict, suffix: str) -> str:
    return sorted(k for k in weights if k.endswith(suffix))[0]


ADAPTERS_CASES = {
    # a zero-byte down projection claiming a bottleneck of 2**28: the others would be padded to it
    "a huge claimed width": (None, lambda w: w.update({_first(w, "adapter_down.0.weight"): torch.zeros(2**28, 0)}),
                             "1 <= r"),
    "up of another width": (None, lambda w: w.update({_first(w, "adapter_up.weight"): torch.zeros(32, 3)}), "do not fit"),
    "a bias of another size": (None, lambda w: w.update({_first(w, "adapter_up.bias"): torch.zeros(5)}), "do not fit"),
    "a flag as a string": (lambda c: c.update(is_parallel="false"), None, "is_parallel"),
    "infinite scaling": (lambda c: c.update(scaling=float("inf")), None, "scaling"),
    "dropout as a string": (lambda c: c.update(dropout="0.1"), None, "dropout"),
    "a tensor name without a parameter": (None, lambda w: w.update({"bert.encoder.layer.0.output.adapters.h": torch.ones(2)}),
                                          "no bottleneck adapter weight"),
}


@pytest.mark.parametrize("case", sorted(ADAPTERS_CASES))
def test_a_hostile_adapters_library_folder_is_refused(tmp_path, case):
    edit_config, edit_weights, message = ADAPTERS_CASES[case]
    folder = _adapters_folder(tmp_path)
    model = AdapterModel(tiny_model("bert"))
    with AllocatedBytes() as counted:
        model.load_adapter(folder, name="baseline")  # the unedited export loads
    assert counted.bytes > 0  # the counter sees a load's tensors
    folder = _adapters_folder(tmp_path / "edited", edit_config, edit_weights)
    with AllocatedBytes() as allocated, pytest.raises(InteropError, match=message):
        model.load_adapter(folder, name="x")
    assert allocated.bytes < 1 << 20
    assert model.list_adapters() == ["baseline"]
