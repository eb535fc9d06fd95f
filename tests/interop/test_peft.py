"""PEFT folders made by the real PEFT library, imported into adapterkit and exported back.

Each case builds a tiny random model (and MiniLM), adapts a copy with PEFT (random adapter weights, so
nothing is the identity by accident), saves it with ``save_pretrained``, loads the folder with
``AdapterModel.load_adapter`` on an identical base, and checks the outputs agree within 1e-5; then
exports the adapterkit adapter with ``interop.export(..., to="peft")``, loads that with
``PeftModel.from_pretrained`` on a fresh base and checks again. Both transformers versions run it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tinymodels import FUSED_ROWS, TINY, tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.interop import InteropError, export, read_foreign

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

TOL = 1e-5


def _randomize(peft_model: torch.nn.Module, seed: int = 0) -> None:
    """Random adapter weights (and heads), so that every mapped tensor matters to the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA's magnitude: near ||W||, its start, but not at it
                p.mul_(1 + torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def _roundtrip(tmp_path, base_for_peft, base_for_us, peft_config, inputs, headed=False, fresh_for_peft=None):
    """PEFT -> adapterkit -> PEFT; returns the adapterkit model (the checks are done here)."""
    peft_model = get_peft_model(base_for_peft, peft_config).eval()
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = _out(peft_model(**inputs))
        with peft_model.disable_adapter():
            bare = _out(peft_model(**inputs))
    assert not torch.allclose(expected, bare, atol=1e-3)  # the adapter changes the outputs
    model = AdapterModel(base_for_us).eval()
    name = model.load_adapter(tmp_path / "peft", name="imported")
    assert name == "imported"
    with torch.no_grad():
        ours = _out(model(**inputs, adapter_names="imported"))
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    # ... and back: PEFT loads adapterkit's export and gives the same outputs
    export(model, "imported", tmp_path / "back", to="peft")
    again = PeftModel.from_pretrained(fresh_for_peft(), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again(**inputs)), expected, atol=TOL, rtol=0)
    return model


LORA_CASES = {
    # rank / alpha patterns, rsLoRA, every BERT projection but the pooler
    "bert": dict(target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
                 r=4, lora_alpha=8, rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"value": 3},
                 use_rslora=True, lora_dropout=0.1),
    # only layer 1, gated FFN, grouped-query k / v
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4,
                  lora_alpha=16, layers_to_transform=[1]),
    # the fused c_attn (q, k, v in thirds), and c_proj (attention output and FFN output), Conv1D layers
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], r=3, lora_alpha=6, rank_pattern={"h.0.attn.c_attn": 2}),
    # fused q, k, v interleaved per head (bloom), per key/value group (falcon), in [q; v; k] blocks
    # (codegen), grouped-query widths and a fused [gate; up] (phi3)
    "bloom": dict(target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], r=3, lora_alpha=6),
    "falcon": dict(target_modules=["query_key_value", "dense_4h_to_h"], r=2, lora_alpha=4,
                   rank_pattern={"h.1.self_attention.query_key_value": 3}),
    "codegen": dict(target_modules=["qkv_proj", "out_proj", "fc_in"], r=3, lora_alpha=6),
    "phi3": dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], r=3, lora_alpha=6),
}
IA3_CASES = {
    "bert": dict(target_modules=["key", "value", "layer.0.output.dense", "layer.1.output.dense"],
                 feedforward_modules=["layer.0.output.dense", "layer.1.output.dense"]),
    "llama": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.mark.parametrize("model_type", sorted(LORA_CASES))
def test_lora_roundtrip(tmp_path, model_type):
    inputs = tiny_inputs(model_type)
    _roundtrip(tmp_path, tiny_model(model_type), tiny_model(model_type), LoraConfig(init_lora_weights=False, **LORA_CASES[model_type]),
               inputs, fresh_for_peft=lambda: tiny_model(model_type))


@pytest.mark.parametrize("model_type", sorted(IA3_CASES))
def test_ia3_roundtrip(tmp_path, model_type):
    inputs = tiny_inputs(model_type)
    _roundtrip(tmp_path, tiny_model(model_type), tiny_model(model_type), IA3Config(init_ia3_weights=False, **IA3_CASES[model_type]),
               inputs, fresh_for_peft=lambda: tiny_model(model_type))


FUSED_IA3 = {  # model_type -> (its fused q/k/v module, its FFN output projection)
    "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
}


@pytest.mark.parametrize("model_type", sorted(FUSED_IA3))
def test_ia3_fused_keys_values_and_ffn(tmp_path, model_type):
    """A fused q/k/v projection ([q; k; v] thirds in GPT-2's c_attn, interleaved per head in Bloom's and
    per key/value group in Falcon's query_key_value): PEFT scales all of it; the query rows must stay
    one to map."""
    fused, ffn = FUSED_IA3[model_type]
    peft_model = get_peft_model(tiny_model(model_type), IA3Config(target_modules=[fused, ffn],
                                                                  feedforward_modules=[ffn])).eval()
    queries = FUSED_ROWS[model_type]["attn_q"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
                if fused in name:
                    p[queries] = 1.0  # k and v rows scaled; q stays 1
    peft_model.save_pretrained(tmp_path / "peft")
    inputs = tiny_inputs(model_type)
    with torch.no_grad():
        expected = _out(peft_model(**inputs))
    model = AdapterModel(tiny_model(model_type)).eval()
    model.load_adapter(tmp_path / "peft", name="a")
    assert model._get("a").config.targets == ["k", "v", "ff"]
    with torch.no_grad():
        torch.testing.assert_close(_out(model(**inputs, adapter_names="a")), expected, atol=TOL, rtol=0)
    export(model, "a", tmp_path / "back", to="peft")
    again = PeftModel.from_pretrained(tiny_model(model_type), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again(**inputs)), expected, atol=TOL, rtol=0)
    # a query scaling has no adapterkit equivalent: refused, naming it, and the model is unchanged
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if f".0.{'attn' if model_type == 'gpt2' else 'self_attention'}."
             f"{fused}.ia3_l" in n)[queries[1]] = 2.0
    peft_model.save_pretrained(tmp_path / "q")
    with pytest.raises(InteropError, match="query"):
        model.load_adapter(tmp_path / "q", name="q")
    assert model.list_adapters() == ["a"]


def _bert_with_head(auto, num_labels=3, seed=0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("bert", **TINY["bert"][0], num_labels=num_labels)
    return auto.from_config(config).eval()


@pytest.mark.parametrize("auto,task_type,head", [
    (AutoModelForSequenceClassification, "SEQ_CLS", "classification"),
    (AutoModelForTokenClassification, "TOKEN_CLS", "token_classification"),
])
def test_heads_from_modules_to_save(tmp_path, auto, task_type, head):
    """PEFT's classifier (with BERT's pooler for sequences) is adapterkit's head, both ways."""
    inputs = tiny_inputs("bert")
    with_head = _bert_with_head(auto)
    ours = copy.deepcopy(with_head.bert)  # the same backbone weights, pooler included
    model = _roundtrip(tmp_path, with_head, ours,
                       LoraConfig(task_type=task_type, target_modules=["query", "value"], r=4, init_lora_weights=False),
                       inputs, fresh_for_peft=lambda: _bert_with_head(auto))
    adapter = model._get("imported")
    assert adapter.task["type"] == head and len(adapter.task["labels"]) == 3


def test_minilm_lora_classifier(tmp_path, minilm_path):
    """The real MiniLM: a PEFT LoRA sequence classifier, imported and exported exactly."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    inputs = dict(tok(["a fine film", "the stocks fell sharply today", "no"], padding=True, return_tensors="pt"))
    inputs.pop("token_type_ids", None)

    def with_head():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()

    first = with_head()
    base = AutoModel.from_pretrained(minilm_path).eval()
    base.pooler.load_state_dict(first.bert.pooler.state_dict())  # same weights: from the same file
    _roundtrip(tmp_path, first, base,
               LoraConfig(task_type="SEQ_CLS", target_modules=["query", "key", "value", "dense"], r=8, lora_alpha=16,
                          exclude_modules=["pooler.dense"], init_lora_weights=False),
               inputs, fresh_for_peft=with_head)


DORA_CASES = {
    "bert": dict(target_modules=["query", "value", "intermediate.dense"], r=4, lora_alpha=8, use_rslora=True),
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=16,
                  rank_pattern={"layers.0.self_attn.q_proj": 2}),
    # GPT-2's fused Conv1D c_attn: DoRA's norm is per output feature, so each third maps on its own
    "gpt2": dict(target_modules=["c_attn", "mlp.c_proj"], r=3, lora_alpha=6),
    # ... and each head's rows of Bloom's fused query_key_value, the halves of Phi-3's gate_up_proj
    "bloom": dict(target_modules=["query_key_value", "dense_4h_to_h"], r=3, lora_alpha=6),
    "phi3": dict(target_modules=["qkv_proj", "gate_up_proj"], r=3, lora_alpha=6),
}


@pytest.mark.parametrize("model_type", sorted(DORA_CASES))
def test_dora_roundtrip(tmp_path, model_type):
    """PEFT's ``use_dora``: lora_A, lora_B and the magnitude per output feature, both ways."""
    inputs = tiny_inputs(model_type)
    model = _roundtrip(tmp_path, tiny_model(model_type), tiny_model(model_type),
                       LoraConfig(init_lora_weights=False, use_dora=True, **DORA_CASES[model_type]),
                       inputs, fresh_for_peft=lambda: tiny_model(model_type))
    assert model._get("imported").config.dora is True


def test_native_dora_on_part_of_a_fused_projection_exports_to_peft(tmp_path):
    """An adapterkit DoRA on GPT-2's q and v only: the exported c_attn carries the k third's identity
    (B zero, magnitude ||W_k||), and PEFT computes what adapterkit does."""
    model = AdapterModel(tiny_model("gpt2")).eval()
    model.add_adapter("d", AdapterConfig("lora", dora=True, bottleneck_size=4, alpha=8, targets=["q", "v", "down"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.adapters["d"].named_parameters():
            p.mul_(1 + torch.randn(p.shape, generator=g) * 0.3) if name.endswith("magnitude") else \
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        ours = _out(model(**inputs, adapter_names="d"))
        assert not torch.allclose(ours, _out(model(**inputs)), atol=1e-3)
    export(model, "d", tmp_path / "peft", to="peft")
    peft_model = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(peft_model(**inputs)), ours, atol=TOL, rtol=0)


def test_dora_magnitude_of_a_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    peft_model = get_peft_model(tiny_model("bert"), LoraConfig(target_modules=["query"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = next(k for k in weights if "lora_magnitude_vector" in k)
    weights[key] = torch.ones(7)
    save_file(weights, str(path))
    model = AdapterModel(tiny_model("bert"))
    with pytest.raises(InteropError, match="magnitude"):
        model.load_adapter(tmp_path / "p", name="x")
    del weights[key]
    save_file(weights, str(path))
    with pytest.raises(InteropError, match="lora_magnitude_vector"):
        model.load_adapter(tmp_path / "p", name="x")
    assert model.list_adapters() == []


@pytest.mark.parametrize("option,value", [("lora_bias", True), ("bias", "all")])
def test_options_without_an_equivalent_are_refused(tmp_path, option, value):
    peft_model = get_peft_model(tiny_model("bert"), LoraConfig(target_modules=["query"], **{option: value}))
    peft_model.save_pretrained(tmp_path / "p")
    model = AdapterModel(tiny_model("bert"))
    with pytest.raises(InteropError, match=option):
        read_foreign(tmp_path / "p", model)
    assert model.list_adapters() == []


def test_unmapped_module_is_refused(tmp_path):
    """BERT's pooler is no LoRA position of adapterkit's: refused by name."""
    peft_model = get_peft_model(tiny_model("bert"), LoraConfig(target_modules=["pooler.dense"]))
    peft_model.save_pretrained(tmp_path / "p")
    with pytest.raises(InteropError, match="pooler.dense"):
        read_foreign(tmp_path / "p", AdapterModel(tiny_model("bert")))


def test_bin_weights_are_read_without_pickle_code(tmp_path):
    """``adapter_model.bin`` is read with weights_only=True: tensors load; anything else is refused."""
    peft_model = get_peft_model(tiny_model("bert"), LoraConfig(target_modules=["query"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "p", safe_serialization=False)
    assert (tmp_path / "p" / "adapter_model.bin").is_file()
    model = AdapterModel(tiny_model("bert"))
    model.load_adapter(tmp_path / "p", name="a")
    assert model._get("a").config.targets == ["q"]

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"x": Evil()}, tmp_path / "p" / "adapter_model.bin")
    with pytest.raises(InteropError, match="weights_only=True"):
        model.load_adapter(tmp_path / "p", name="b")
    assert model.list_adapters() == ["a"]
