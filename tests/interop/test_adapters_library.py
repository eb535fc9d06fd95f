"""adapters-library (AdapterHub) folders made by the real ``adapters`` 1.3.0, imported into adapterkit and
exported back; outputs compared in eval mode within 1e-5. ``adapters`` needs transformers 4.57, so
this runs in the 4.57 environment (``.venv-tf4``) and is skipped where it is not installed."""

from __future__ import annotations

import pytest
import torch
from tinymodels import TINY, tiny_inputs

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.interop import InteropError, export, read_foreign

adapters = pytest.importorskip("adapters")
from transformers import AutoConfig, BertModel  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random BERT on disk, so that both libraries load the very same weights."""
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(AutoConfig.for_model("bert", **TINY["bert"][0])).save_pretrained(path)
    return path


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".adapters." in name or name.startswith("heads.") or name.endswith(".scaling"):
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith(".scaling") else 0.0))


def _source(base_dir, config, head: str | None, name: str = "task", num_labels: int = 3, std: float = 0.3):
    """An adapters-library model with one random adapter (and head), active, in eval mode."""
    if head is None:
        model = BertModel.from_pretrained(base_dir)
        adapters.init(model)
    else:
        model = adapters.AutoAdapterModel.from_pretrained(base_dir)
    model.add_adapter(name, config=config)
    if head == "classification":
        model.add_classification_head(name, num_labels=num_labels)
    elif head == "tagging":
        model.add_tagging_head(name, num_labels=num_labels)
    _randomize(model, std=std)
    model.set_active_adapters(name)
    return model.eval()


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def _ours(base_dir) -> AdapterModel:
    return AdapterModel(BertModel.from_pretrained(base_dir)).eval()


CASES = {
    "double_seq_bn": (lambda: adapters.DoubleSeqBnConfig(reduction_factor=8), "classification", "houlsby"),
    "double_seq_bn_gelu_leave_out": (lambda: adapters.DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu",
                                                                        leave_out=[0]), None, "houlsby"),
    "seq_bn_no_ln_before": (lambda: adapters.SeqBnConfig(original_ln_before=False, non_linearity="tanh"), "tagging", "pfeiffer"),
    "seq_bn_attention_only": (lambda: adapters.SeqBnConfig(original_ln_before=False, mh_adapter=True, output_adapter=False),
                              None, "serial_attention"),
    "par_bn": (lambda: adapters.ParBnConfig(), "classification", "parallel"),
    "par_bn_scaled_2": (lambda: adapters.ParBnConfig(scaling=2.0, reduction_factor=16), None, "parallel"),
    "par_bn_learned_scaling": (lambda: adapters.ParBnConfig(scaling="learned"), None, "parallel"),
    "double_seq_bn_channel_scaling": (lambda: adapters.DoubleSeqBnConfig(scaling="channel"), None, "houlsby"),
    "double_seq_bn_per_layer_width": (lambda: adapters.DoubleSeqBnConfig(reduction_factor={"1": 16, "default": 4}), None, "houlsby"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bottleneck_roundtrip(tmp_path, base_dir, case):
    make_config, head, kind = CASES[case]
    source = _source(base_dir, make_config(), head)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = _out(source(**inputs))
    source.save_adapter(str(tmp_path / "src"), "task", with_head=head is not None)
    model = _ours(base_dir)
    assert model.load_adapter(tmp_path / "src") == "task"  # the name saved in the folder
    assert model._get("task").config.kind == kind
    with torch.no_grad():
        bare = _out(model(**inputs, adapter_names=None)) if head is None else None
        ours = _out(model(**inputs, adapter_names="task"))
    if bare is not None:
        assert not torch.allclose(bare, ours, atol=1e-3)
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    # back: the adapters library loads adapterkit's export and gives the same outputs
    export(model, "task", tmp_path / "back", to="adapters")
    if head is None:
        again = BertModel.from_pretrained(base_dir)
        adapters.init(again)
    else:
        again = adapters.AutoAdapterModel.from_pretrained(base_dir)
    loaded = again.load_adapter(str(tmp_path / "back"), use_safetensors=True)
    again.set_active_adapters(loaded)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again(**inputs)), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("make_config,option", [
    (lambda: adapters.SeqBnConfig(), "original_ln_before"),
    (lambda: adapters.DoubleSeqBnConfig(ln_after=True), "ln_after"),
    (lambda: adapters.SeqBnConfig(original_ln_before=False, use_gating=True), "use_gating"),
    (lambda: adapters.DoubleSeqBnConfig(non_linearity="gelu_new"), "non_linearity"),
    (lambda: adapters.ParBnConfig(mh_adapter=True), "mh_adapter"),
])
def test_options_without_an_equivalent_are_refused(tmp_path, base_dir, make_config, option):
    source = _source(base_dir, make_config(), None)
    source.save_adapter(str(tmp_path / "src"), "task")
    model = _ours(base_dir)
    with pytest.raises(InteropError, match=option):
        model.load_adapter(tmp_path / "src")
    assert model.list_adapters() == []


def test_houlsby_with_trained_norms_is_not_exported(tmp_path, base_dir):
    """adapterkit's Houlsby trains the model's norm affines; the adapters library has no place for them."""
    model = _ours(base_dir)
    model.add_adapter("h", AdapterConfig("houlsby"))
    with torch.no_grad():
        model._get("h").layers[0].norms[0].scale.add_(0.5)
    with pytest.raises(InteropError, match="train_layer_norms"):
        export(model, "h", tmp_path / "out", to="adapters")
    model.add_adapter("lora", AdapterConfig("lora"))
    with pytest.raises(InteropError, match="lora"):
        export(model, "lora", tmp_path / "out2", to="adapters")


def test_minilm_houlsby_roundtrip(tmp_path, minilm_path):
    """The real MiniLM with a Houlsby adapter and a classification head, both ways."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    inputs = dict(tok(["a fine film", "the stocks fell sharply today", "no"], padding=True, return_tensors="pt"))
    # weights of a trained adapter's size (std 0.05). At std 0.3 the two differ by 4.9e-5 in float32,
    # but by 1e-13 in float64: float32 rounding (the adapters library differs from its own float64
    # result by 4.2e-5 there), not a difference in the maths.
    source = _source(minilm_path, adapters.DoubleSeqBnConfig(), "classification", num_labels=2, std=0.05)
    with torch.no_grad():
        expected = source(**inputs).logits
        assert expected.abs().max() > 0.1  # the head and adapter are not near zero
    source.save_adapter(str(tmp_path / "src"), "task")
    model = AdapterModel(BertModel.from_pretrained(minilm_path)).eval()
    model.load_adapter(tmp_path / "src", name="imported")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, adapter_names="imported").logits, expected, atol=TOL, rtol=0)
    export(model, "imported", tmp_path / "back", to="adapters")
    again = adapters.AutoAdapterModel.from_pretrained(minilm_path)
    again.set_active_adapters(again.load_adapter(str(tmp_path / "back"), use_safetensors=True))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**inputs).logits, expected, atol=TOL, rtol=0)


def test_bin_folder_is_read_with_weights_only(tmp_path, base_dir):
    """The library's default ``.bin`` files load through torch.load(weights_only=True)."""
    source = _source(base_dir, adapters.DoubleSeqBnConfig(), None)
    source.save_adapter(str(tmp_path / "src"), "task")
    assert (tmp_path / "src" / "pytorch_adapter.bin").is_file()
    converted = read_foreign(tmp_path / "src", _ours(base_dir))
    assert converted.config.kind == "houlsby" and converted.source["format"] == "adapters"
