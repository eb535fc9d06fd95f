"""Tiny random models of every supported architecture (built from configs, as transformers' own tests do)."""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

torch.set_num_threads(2)

_BERT_DIMS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)
_DECODER_DIMS = dict(_BERT_DIMS, num_key_value_heads=2, pad_token_id=0)

# model_type -> (config kwargs, auto class). Decoders load with their LM head, encoder-decoders as
# seq2seq LMs, as users load them.
TINY: dict[str, tuple[dict, type]] = {
    "bert": (_BERT_DIMS, AutoModel),
    "roberta": (_BERT_DIMS, AutoModel),
    "xlm-roberta": (_BERT_DIMS, AutoModel),
    "electra": (dict(_BERT_DIMS, embedding_size=32), AutoModel),
    "distilbert": (dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99), AutoModel),
    "deberta-v2": (_BERT_DIMS, AutoModel),
    "mpnet": (_BERT_DIMS, AutoModel),
    "gpt2": (dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, bos_token_id=1, eos_token_id=2, pad_token_id=0), AutoModelForCausalLM),
    "llama": (_DECODER_DIMS, AutoModelForCausalLM),
    "mistral": (_DECODER_DIMS, AutoModelForCausalLM),
    "qwen2": (_DECODER_DIMS, AutoModelForCausalLM),
    "t5": (dict(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8, vocab_size=99, decoder_start_token_id=0), AutoModelForSeq2SeqLM),
    "bart": (
        dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=99, max_position_embeddings=64,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None),
        AutoModelForSeq2SeqLM,
    ),
    "vit": (dict(_BERT_DIMS, image_size=32, patch_size=8), AutoModel),
}
ENCODERS = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "mpnet", "vit"]
DECODERS = ["gpt2", "llama", "mistral", "qwen2"]
ENCODER_DECODERS = ["t5", "bart"]


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    kwargs, auto = TINY[model_type]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = auto.from_config(config).to(dtype).eval()
    return model


def tiny_inputs(model_type: str, batch: int = 4, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """A padded batch: rows of different lengths with an attention mask (right padding)."""
    g = torch.Generator().manual_seed(seed)
    if model_type == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):
        n = seq - (i % 3) * 2  # lengths seq, seq-2, seq-4, ...
        mask[i, n:] = 0
        ids[i, n:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model_type in ENCODER_DECODERS:
        inputs["decoder_input_ids"] = torch.randint(3, 99, (batch, 5), generator=g)
    return inputs


def package_dir(module: str) -> pathlib.Path:
    return pathlib.Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))


