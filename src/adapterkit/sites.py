"""Where adapters go in each architecture: one row of module names per ``config.model_type``.

A row names, relative to one transformer layer, the modules adapterkit hooks into. Each entry is a
tuple of candidates, because transformers renames modules between releases (ViT's 4.57
``attention.output.dense`` is 5.x's ``attention.o_proj``): the first candidate that exists is used.

- ``layers``: the ModuleList(s) holding the transformer layers (name suffixes). In encoder-decoder
  models the decoder's layers are numbered after the encoder's.
- ``attn_out``: the attention block's output projection (serial adapters act on its output).
- ``ffn_in``: the module whose first input is the feed-forward block's input (feeds parallel adapters).
- ``ffn_out``: the feed-forward block's output projection (or the whole block, for mixtures of
  experts: the adapter acts on the block's combined output, never inside one expert).
- ``norms``: the layer's norms (every candidate that exists is used), whose affines a task may train.
- ``pooling``: which token a sequence-classification head reads: ``first`` (encoders, [CLS]),
  ``last`` (decoders: the last non-padding token) or ``None`` (no classification heads).
- ``flat``: the modules of the row that see the batch's tokens flattened to ``(B·T, d)`` (OPT's FFN),
  rather than ``(B, T, d)``. Their rows are contiguous blocks of tokens, so a mixed batch views them
  as ``(B, T, d)``; anything not declared here must lead with the batch (``site_check`` verifies it).
- ``shared``: each layer of ``layers`` runs several times per forward pass (ALBERT's one shared
  layer). adapterkit then puts one adapter on the shared layer, applied at every depth it runs, just
  as ALBERT shares the layer's own weights; there are no per-depth adapters on a shared layer.

Optional roles, for the kinds that act on projections inside a sublayer (LoRA, IA3); a row without
them still serves the bottleneck kinds, and a kind that targets a role the row lacks says so:

- ``attn_q`` / ``attn_k`` / ``attn_v``: the self-attention's query, key and value projections.
- ``attn_qkv``: one fused projection computing q, k and v, for rows without separate ones; each of
  q, k, v then owns its rows of the output (a ``Part``). The query is as wide as the attention output
  projection's input (heads x head dim), key and value share the rest equally (grouped-query and
  multi-query widths follow). ``qkv_groups``: the output is that many equal blocks, each holding its
  q, k and v rows in ``qkv_order``: 1 (the default) for [q; k; v] (GPT-2's ``c_attn``, Phi-3's
  ``qkv_proj``), ``"kv_heads"`` for one block per key/value head, counted from the config's
  ``num_attention_heads`` and the widths (Bloom and GPT-NeoX's per-head (heads, 3, head_dim),
  Falcon's per-group queries then key then value), or a number (CodeGen's 4 model-parallel blocks,
  each [q; v; k]).
- ``ffn_up``: the FFN's input projection (``up_proj`` of a gated FFN); ``ffn_gate``: its gate
  projection, where the FFN is gated (the one the activation is applied to, as Llama's ``gate_proj``).
  ``ffn_gate_up``: one fused projection whose output is [gate; up] in halves (Phi-3's ``gate_up_proj``,
  ModernBERT's ``Wi``), for rows without separate ones.

Adding an architecture is one more row; ``tests/core/test_architectures.py`` checks every row on a
tiny model under both supported transformers versions (``test_every_kind.py`` with every adapter kind), and
``docs/architectures.md`` is generated from this table (``python -m adapterkit.coverage``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SITES_VERSION = 1

# Optional roles (see the module docstring): resolved when the row names them, else None.
PROJECTION_ROLES = ("attn_q", "attn_k", "attn_v", "ffn_up", "ffn_gate")
_FUSED = ("attn_qkv", "ffn_gate_up")  # fused modules serving several of those roles


@dataclass(frozen=True)
class SiteSpec:
    """Module names of one architecture's layers (see the module docstring for each field)."""

    layers: tuple[str, ...]
    attn_out: tuple[str, ...]
    ffn_in: tuple[str, ...]
    ffn_out: tuple[str, ...]
    norms: tuple[str, ...]
    pooling: str | None = "first"
    attn_q: tuple[str, ...] = ()
    attn_k: tuple[str, ...] = ()
    attn_v: tuple[str, ...] = ()
    attn_qkv: tuple[str, ...] = ()
    qkv_groups: int | str = 1
    qkv_order: str = "qkv"
    ffn_up: tuple[str, ...] = ()
    ffn_gate: tuple[str, ...] = ()
    ffn_gate_up: tuple[str, ...] = ()
    flat: tuple[str, ...] = ()
    shared: bool = False

    def __post_init__(self) -> None:
        for f in ("layers", "attn_out", "ffn_in", "ffn_out", "norms", "flat", *PROJECTION_ROLES, *_FUSED):
            value = getattr(self, f)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, tuple | list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"SiteSpec.{f} must be a list of module names; got {value!r}")
            object.__setattr__(self, f, tuple(value))
        for f in ("layers", "attn_out", "ffn_in", "ffn_out"):
            if not getattr(self, f):
                raise ValueError(f"SiteSpec.{f} needs at least one module name")
        if self.pooling not in ("first", "last", None):
            raise ValueError(f"SiteSpec.pooling must be 'first', 'last' or null; got {self.pooling!r}")
        if not isinstance(self.shared, bool):
            raise ValueError(f"SiteSpec.shared must be true or false; got {self.shared!r}")
        groups = self.qkv_groups
        if groups != "kv_heads" and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
            raise ValueError(f"SiteSpec.qkv_groups must be a positive integer or 'kv_heads'; got {groups!r}")
        if not isinstance(self.qkv_order, str) or sorted(self.qkv_order) != ["k", "q", "v"]:
            raise ValueError(f"SiteSpec.qkv_order must order the letters q, k, v; got {self.qkv_order!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteSpec:
        """Build from a JSON object; unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"a SiteSpec must be a JSON object; got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SiteSpec key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        missing = sorted(k for k in ("layers", "attn_out", "ffn_in", "ffn_out", "norms") if k not in data)
        if missing:
            raise ValueError(f"SiteSpec is missing {', '.join(missing)}")
        return cls(**data)


_BERT_LIKE = SiteSpec(
    layers=("encoder.layer",),
    attn_out=("attention.output.dense",),
    ffn_in=("intermediate",),
    ffn_out=("output.dense",),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    attn_q=('attention.self.query', 'attention.self.query_proj'),
    attn_k=('attention.self.key', 'attention.self.key_proj'),
    attn_v=('attention.self.value', 'attention.self.value_proj'),
    ffn_up=('intermediate.dense',),
)
_LLAMA_LIKE = SiteSpec(
    layers=("layers",),
    attn_out=("self_attn.o_proj",),
    ffn_in=("mlp",),
    ffn_out=("mlp.down_proj",),
    norms=("input_layernorm", "post_attention_layernorm"),
    pooling="last",
    attn_q=('self_attn.q_proj',),
    attn_k=('self_attn.k_proj',),
    attn_v=('self_attn.v_proj',),
    ffn_up=('mlp.up_proj',),
    ffn_gate=('mlp.gate_proj',),
)
# Gemma 2 / 3 norm the attention and FFN outputs too, before their residual adds.
_GEMMA2_LIKE = SiteSpec(
    layers=("layers",),
    attn_out=("self_attn.o_proj",),
    ffn_in=("mlp",),
    ffn_out=("mlp.down_proj",),
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    pooling="last",
    attn_q=('self_attn.q_proj',),
    attn_k=('self_attn.k_proj',),
    attn_v=('self_attn.v_proj',),
    ffn_up=('mlp.up_proj',),
    ffn_gate=('mlp.gate_proj',),
)
# Mixtures of experts: the adapter sits on the whole sparse block's output (B, T, d); inside, each
# expert sees only the tokens routed to it. 4.57 names Mixtral's block ``block_sparse_moe``.
_MOE_LIKE = SiteSpec(
    layers=("layers",),
    attn_out=("self_attn.o_proj",),
    ffn_in=("mlp", "block_sparse_moe"),
    ffn_out=("mlp", "block_sparse_moe"),
    norms=("input_layernorm", "post_attention_layernorm"),
    pooling="last",
    attn_q=('self_attn.q_proj',),
    attn_k=('self_attn.k_proj',),
    attn_v=('self_attn.v_proj',),
)
_GPT2_LIKE = SiteSpec(
    layers=("h",),
    attn_out=("attn.c_proj",),
    ffn_in=("mlp",),
    ffn_out=("mlp.c_proj",),
    norms=("ln_1", "ln_2"),
    pooling="last",
    attn_qkv=('attn.c_attn',),
    ffn_up=('mlp.c_fc',),
)
# Attention and FFN in parallel off one norm (GPT-J, CodeGen).
_GPTJ_LIKE = SiteSpec(
    layers=("h",),
    attn_out=("attn.out_proj",),
    ffn_in=("mlp",),
    ffn_out=("mlp.fc_out",),
    norms=("ln_1",),
    pooling="last",
    attn_q=('attn.q_proj',),
    attn_k=('attn.k_proj',),
    attn_v=('attn.v_proj',),
    ffn_up=('mlp.fc_in',),
)
_BLOOM_LIKE = SiteSpec(
    layers=("h",),
    attn_out=("self_attention.dense",),
    ffn_in=("mlp",),
    ffn_out=("mlp.dense_4h_to_h",),
    norms=("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp"),  # Falcon: ln_attn / ln_mlp
    pooling="last",
    attn_qkv=("self_attention.query_key_value",),
    qkv_groups="kv_heads",  # Bloom: (heads, 3, head_dim); Falcon: per key/value head, its queries then k, v
    ffn_up=('mlp.dense_h_to_4h',),
)
_BART_LIKE = SiteSpec(
    layers=("encoder.layers", "decoder.layers"),
    attn_out=("self_attn.out_proj",),
    ffn_in=("fc1",),
    ffn_out=("fc2",),
    norms=("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
    pooling=None,
    attn_q=('self_attn.q_proj',),
    attn_k=('self_attn.k_proj',),
    attn_v=('self_attn.v_proj',),
    ffn_up=('fc1',),
)
_XGLM_LIKE = SiteSpec(  # BART's decoder layer, alone
    layers=("layers",),
    attn_out=("self_attn.out_proj",),
    ffn_in=("fc1",),
    ffn_out=("fc2",),
    norms=("self_attn_layer_norm", "final_layer_norm"),
    pooling="last",
    attn_q=('self_attn.q_proj',),
    attn_k=('self_attn.k_proj',),
    attn_v=('self_attn.v_proj',),
    ffn_up=('fc1',),
)
_T5_LIKE = SiteSpec(
    layers=("encoder.block", "decoder.block"),
    attn_out=("layer.0.SelfAttention.o", "layer.0.LocalSelfAttention.o", "layer.0.TransientGlobalSelfAttention.o"),
    ffn_in=("layer.2.DenseReluDense", "layer.1.DenseReluDense"),  # decoder first: it has 3 sublayers
    ffn_out=("layer.2.DenseReluDense.wo", "layer.1.DenseReluDense.wo"),
    norms=("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm"),
    pooling=None,
    attn_q=("layer.0.SelfAttention.q", "layer.0.LocalSelfAttention.q", "layer.0.TransientGlobalSelfAttention.q"),
    attn_k=("layer.0.SelfAttention.k", "layer.0.LocalSelfAttention.k", "layer.0.TransientGlobalSelfAttention.k"),
    attn_v=("layer.0.SelfAttention.v", "layer.0.LocalSelfAttention.v", "layer.0.TransientGlobalSelfAttention.v"),
    # decoder blocks first (their FFN is layer.2); gated FFNs (T5 v1.1): wi_1 is up, wi_0 the gate
    ffn_up=("layer.2.DenseReluDense.wi", "layer.1.DenseReluDense.wi",
            "layer.2.DenseReluDense.wi_1", "layer.1.DenseReluDense.wi_1"),
    ffn_gate=("layer.2.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_0"),
)
_VIT_LIKE = SiteSpec(
    layers=("encoder.layer", "layers"),  # 4.57: encoder.layer; 5.x: layers
    attn_out=("attention.output.dense", "attention.o_proj"),
    ffn_in=("intermediate", "mlp"),
    ffn_out=("output.dense", "mlp.fc2"),
    norms=("layernorm_before", "layernorm_after"),
    attn_q=('attention.attention.query', 'attention.q_proj'),
    attn_k=('attention.attention.key', 'attention.k_proj'),
    attn_v=('attention.attention.value', 'attention.v_proj'),
    ffn_up=('intermediate.dense', 'mlp.fc1'),
)
_CLIP_LIKE = SiteSpec(
    layers=("encoder.layers",),
    attn_out=("self_attn.out_proj",),
    ffn_in=("mlp",),
    ffn_out=("mlp.fc2",),
    norms=("layer_norm1", "layer_norm2"),
    attn_q=('self_attn.q_proj',),
    attn_k=('self_attn.k_proj',),
    attn_v=('self_attn.v_proj',),
    ffn_up=('mlp.fc1',),
)

SITES: dict[str, SiteSpec] = {
    # BERT family (post-norm encoders)
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "data2vec-text": _BERT_LIKE,
    "ernie": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "rembert": _BERT_LIKE,
    "deberta": replace(_BERT_LIKE, attn_qkv=("attention.self.in_proj",), qkv_groups="kv_heads"),  # (heads, 3, head_dim)
    "deberta-v2": _BERT_LIKE,
    "roberta-prelayernorm": SiteSpec(
        layers=("encoder.layer",),
        attn_out=("attention.output.dense",),
        ffn_in=("intermediate.dense",),  # its input is the FFN's normed input (the LN is inside `intermediate`)
        ffn_out=("output.dense",),
        norms=("attention.LayerNorm", "intermediate.LayerNorm"),
        attn_q=('attention.self.query', 'attention.self.query_proj'),
        attn_k=('attention.self.key', 'attention.self.key_proj'),
        attn_v=('attention.self.value', 'attention.self.value_proj'),
        ffn_up=('intermediate.dense',),
    ),
    "xlm-roberta-xl": SiteSpec(
        layers=("encoder.layer",),
        attn_out=("attention.output.dense",),
        ffn_in=("intermediate",),
        ffn_out=("output.dense",),
        norms=("attention.self_attn_layer_norm", "LayerNorm"),
        attn_q=('attention.self.query', 'attention.self.query_proj'),
        attn_k=('attention.self.key', 'attention.self.key_proj'),
        attn_v=('attention.self.value', 'attention.self.value_proj'),
        ffn_up=('intermediate.dense',),
    ),
    "megatron-bert": SiteSpec(
        layers=("encoder.layer",),
        attn_out=("attention.output.dense",),
        ffn_in=("intermediate",),
        ffn_out=("output.dense",),
        norms=("attention.ln", "ln"),
        attn_q=('attention.self.query', 'attention.self.query_proj'),
        attn_k=('attention.self.key', 'attention.self.key_proj'),
        attn_v=('attention.self.value', 'attention.self.value_proj'),
        ffn_up=('intermediate.dense',),
    ),
    "distilbert": SiteSpec(
        layers=("transformer.layer",),
        attn_out=("attention.out_lin",),
        ffn_in=("ffn",),
        ffn_out=("ffn.lin2",),
        norms=("sa_layer_norm", "output_layer_norm"),
        attn_q=('attention.q_lin',),
        attn_k=('attention.k_lin',),
        attn_v=('attention.v_lin',),
        ffn_up=('ffn.lin1',),
    ),
    "mpnet": SiteSpec(
        layers=("encoder.layer",),
        attn_out=("attention.attn.o",),
        ffn_in=("intermediate",),
        ffn_out=("output.dense",),
        norms=("attention.LayerNorm", "output.LayerNorm"),
        attn_q=('attention.attn.q',),
        attn_k=('attention.attn.k',),
        attn_v=('attention.attn.v',),
        ffn_up=('intermediate.dense',),
    ),
    "albert": SiteSpec(
        layers=("albert_layers",),
        attn_out=("attention.dense",),
        ffn_in=("ffn",),
        ffn_out=("ffn_output",),
        norms=("attention.LayerNorm", "full_layer_layer_norm"),
        shared=True,
        attn_q=('attention.query',),
        attn_k=('attention.key',),
        attn_v=('attention.value',),
        ffn_up=('ffn',),
    ),
    "modernbert": SiteSpec(
        layers=("layers",),
        attn_out=("attn.Wo",),
        ffn_in=("mlp",),
        ffn_out=("mlp.Wo",),
        norms=("attn_norm", "mlp_norm"),  # layer 0's attn_norm is an Identity: skipped
        attn_qkv=('attn.Wqkv',),
        ffn_gate_up=("mlp.Wi",),  # [activated half; linear half], which ModernBERT calls input and gate
    ),
    # decoders
    "gpt2": _GPT2_LIKE,
    "gpt_bigcode": replace(_GPT2_LIKE, qkv_groups="kv_heads"),  # multi-query [q; k; v], else (heads, 3, head_dim)
    "gpt_neo": SiteSpec(
        layers=("h",),
        attn_out=("attn.attention.out_proj",),
        ffn_in=("mlp",),
        ffn_out=("mlp.c_proj",),
        norms=("ln_1", "ln_2"),
        pooling="last",
        attn_q=('attn.attention.q_proj',),
        attn_k=('attn.attention.k_proj',),
        attn_v=('attn.attention.v_proj',),
        ffn_up=('mlp.c_fc',),
    ),
    "gptj": _GPTJ_LIKE,
    "codegen": replace(_GPTJ_LIKE, attn_qkv=("attn.qkv_proj",), qkv_groups=4, qkv_order="qvk"),  # 4 blocks of [q; v; k]
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "helium": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "phi3": replace(_LLAMA_LIKE, attn_qkv=("self_attn.qkv_proj",), ffn_gate_up=("mlp.gate_up_proj",)),
    "stablelm": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,  # one norm: attention and FFN run in parallel off it
    "olmo2": SiteSpec(  # OLMo 2 norms the sublayers' outputs, not their inputs
        layers=("layers",),
        attn_out=("self_attn.o_proj",),
        ffn_in=("mlp",),
        ffn_out=("mlp.down_proj",),
        norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        pooling="last",
        attn_q=('self_attn.q_proj',),
        attn_k=('self_attn.k_proj',),
        attn_v=('self_attn.v_proj',),
        ffn_up=('mlp.up_proj',),
        ffn_gate=('mlp.gate_proj',),
    ),
    "starcoder2": SiteSpec(
        layers=("layers",),
        attn_out=("self_attn.o_proj",),
        ffn_in=("mlp",),
        ffn_out=("mlp.c_proj",),
        norms=("input_layernorm", "post_attention_layernorm"),
        pooling="last",
        attn_q=('self_attn.q_proj',),
        attn_k=('self_attn.k_proj',),
        attn_v=('self_attn.v_proj',),
        ffn_up=('mlp.c_fc',),
    ),
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "mixtral": _MOE_LIKE,
    "qwen2_moe": _MOE_LIKE,
    "qwen3_moe": _MOE_LIKE,
    "olmoe": _MOE_LIKE,
    "phi": SiteSpec(
        layers=("layers",),
        attn_out=("self_attn.dense",),
        ffn_in=("mlp",),
        ffn_out=("mlp.fc2",),
        norms=("input_layernorm",),
        pooling="last",
        attn_q=('self_attn.q_proj',),
        attn_k=('self_attn.k_proj',),
        attn_v=('self_attn.v_proj',),
        ffn_up=('mlp.fc1',),
    ),
    "gpt_neox": SiteSpec(
        layers=("layers",),
        attn_out=("attention.dense",),
        ffn_in=("mlp",),
        ffn_out=("mlp.dense_4h_to_h",),
        norms=("input_layernorm", "post_attention_layernorm"),
        pooling="last",
        attn_qkv=("attention.query_key_value",),
        qkv_groups="kv_heads",  # (heads, 3, head_dim)
        ffn_up=('mlp.dense_h_to_4h',),
    ),
    "bloom": _BLOOM_LIKE,
    "falcon": _BLOOM_LIKE,
    "opt": SiteSpec(
        layers=("decoder.layers",),
        attn_out=("self_attn.out_proj",),
        ffn_in=("fc1",),
        ffn_out=("fc2",),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        pooling="last",
        flat=("fc1", "fc2", "final_layer_norm"),  # OPT flattens the FFN's tokens to (B·T, d)
        attn_q=('self_attn.q_proj',),
        attn_k=('self_attn.k_proj',),
        attn_v=('self_attn.v_proj',),
        ffn_up=('fc1',),
    ),
    "xglm": _XGLM_LIKE,
    "biogpt": _XGLM_LIKE,
    # encoder-decoders
    "t5": _T5_LIKE,
    "mt5": _T5_LIKE,
    "umt5": _T5_LIKE,
    "longt5": _T5_LIKE,
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
    "pegasus": _BART_LIKE,
    "marian": _BART_LIKE,
    "blenderbot": _BART_LIKE,
    "blenderbot-small": _BART_LIKE,
    "plbart": _BART_LIKE,
    "m2m_100": _BART_LIKE,
    # vision encoders
    "vit": _VIT_LIKE,
    "deit": _VIT_LIKE,
    "vit_msn": _VIT_LIKE,
    "vit_mae": _VIT_LIKE,
    "beit": _VIT_LIKE,
    "data2vec-vision": _VIT_LIKE,
    "dinov2": SiteSpec(
        layers=("encoder.layer",),
        attn_out=("attention.output.dense", "attention.o_proj"),
        ffn_in=("mlp",),
        ffn_out=("mlp.fc2", "mlp.down_proj"),  # down_proj: the SwiGLU variant
        norms=("norm1", "norm2"),
        attn_q=('attention.attention.query', 'attention.q_proj'),
        attn_k=('attention.attention.key', 'attention.k_proj'),
        attn_v=('attention.attention.value', 'attention.v_proj'),
        ffn_up=('mlp.fc1',),
    ),
    "clip_vision_model": _CLIP_LIKE,
    "siglip_vision_model": replace(_CLIP_LIKE, pooling=None),  # no [CLS] token: no classification pooling
}

# Model types adapterkit knows and refuses, with the reason: a row would be silently wrong.
REFUSED: dict[str, str] = {
    "fsmt": (
        "FSMT's layers are time-major: they see (T, B, d), not (B, T, d), so per-row adapters would mix "
        "rows; adapterkit refuses it rather than answer wrongly"
    ),
}


@dataclass(frozen=True)
class Part:
    """The rows of a fused projection's output (its features) that one role owns: the output, ``groups``
    blocks of ``block`` features each, gives this role features [start, stop) of every block.

    One block is a plain slice (GPT-2's [q; k; v]); one block per head interleaves them (Bloom's
    (heads, 3, head_dim)). The same rows index the projection's (out, in) weight and its bias, so an
    update confined to them (LoRA's B, IA3's scaling, DoRA's norms per output feature) is exact.
    """

    groups: int
    block: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """How many output features the role owns."""
        return self.groups * (self.stop - self.start)

    @property
    def width(self) -> int:
        """The fused projection's output features."""
        return self.groups * self.block

    def take(self, t: Tensor, dim: int = -1) -> Tensor:
        """This part of ``t`` along ``dim`` (``width`` there -> ``size``): a view for one block (writes
        reach ``t``), else a copy (write it back with ``put``)."""
        dim = dim % t.dim()
        if self.groups == 1:
            return t.narrow(dim, self.start, self.stop - self.start)
        blocks = t.unflatten(dim, (self.groups, self.block))  # (..., groups, block, ...)
        return blocks.narrow(dim + 1, self.start, self.stop - self.start).flatten(dim, dim + 1)

    def put(self, t: Tensor, value: Tensor, dim: int = -1) -> None:
        """Write ``value`` (``size`` along ``dim``) into this part of ``t``, in place; nothing to do when
        ``value`` is ``take``'s view of ``t`` itself."""
        dim = dim % t.dim()
        n = self.stop - self.start
        if self.groups == 1:
            target = t.narrow(dim, self.start, n)
        else:
            target = t.unflatten(dim, (self.groups, self.block)).narrow(dim + 1, self.start, n)
            value = value.unflatten(dim, (self.groups, n))
        if value.data_ptr() == target.data_ptr() and value.stride() == target.stride():
            return
        target.copy_(value)


@dataclass
class LayerSites:
    """The modules of one transformer layer that adapters attach to.

    ``parts`` maps a role served by part of a fused module's output (GPT-2's ``c_attn`` for
    ``attn_q`` / ``attn_k`` / ``attn_v``) to its rows there. ``names``: role -> the module's name
    within the layer. ``flat``: the roles and norm names whose modules see tokens flattened to (B·T, d).
    """

    index: int
    path: str
    attn_out: nn.Module
    ffn_in: nn.Module
    ffn_out: nn.Module
    norms: list[tuple[str, nn.Module]]
    attn_q: nn.Module | None = None
    attn_k: nn.Module | None = None
    attn_v: nn.Module | None = None
    ffn_up: nn.Module | None = None
    ffn_gate: nn.Module | None = None
    parts: dict[str, Part] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    flat: frozenset[str] = frozenset()

    def dims(self, role: str) -> tuple[int, int] | None:
        """(in_features, out_features) of the projection playing ``role`` (its part, for a fused
        one); None where this layer has no such module."""
        module = getattr(self, role, None)
        if module is None:
            return None
        n_in, n_out = linear_dims(module)
        part = self.parts.get(role)
        return n_in, (n_out if part is None else part.size)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or of transformers' ``Conv1D`` (GPT-2), whose
    weight is stored transposed, (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    raise UnknownArchitecture(
        f"{type(module).__name__} is not a linear projection (nn.Linear or Conv1D); "
        f"LoRA and IA3 need one at this role"
    )


class UnknownArchitecture(ValueError):
    pass


def sites_for(model_type: str) -> SiteSpec:
    """The table row for ``model_type``; a clear error names what to add when there is none."""
    if model_type in REFUSED:
        raise UnknownArchitecture(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    try:
        return SITES[model_type]
    except KeyError:
        raise UnknownArchitecture(
            f"adapterkit has no site table row for model_type {model_type!r}. Add one to SITES in "
            f"adapterkit/sites.py (the modules of one layer: attention output projection, FFN input, FFN "
            f"output projection, layer norms), pass sites=SiteSpec(...) yourself, or pass sites='guess' to "
            f"try the known rows' module names on this model. Known: {', '.join(sorted(SITES))}"
        ) from None


def parse_sites(text: str | None) -> SiteSpec | str | None:
    """A command line's ``--sites``: empty for the table row, ``guess``, a JSON SiteSpec object, or the
    path of a JSON file holding one."""
    if text is None or text == "" or text == "table":
        return None
    if text == "guess":
        return "guess"
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--sites must be 'guess', a JSON SiteSpec or a JSON file; {text!r} is none of these")
        source = path.read_text(encoding="utf-8")
    try:
        data = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"--sites: not valid JSON: {e}") from None
    return SiteSpec.from_dict(data)


def _modules_of(layer: nn.Module) -> dict[str, nn.Module]:
    return dict(layer.named_modules())


def _first(modules: dict[str, nn.Module], candidates: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in candidates:
        if name in modules:
            return name, modules[name]
    return None


def _layer_lists(model: nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, nn.ModuleList]]:
    pattern = re.compile(r"(?:^|\.)(?:" + "|".join(re.escape(s) for s in suffixes) + r")$")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and pattern.search(n)]


def find_layers(model: nn.Module, spec: SiteSpec) -> list[LayerSites]:
    """Resolve a row against a model: one LayerSites per transformer layer, in module order.

    Raises UnknownArchitecture when the row's names are not in the model (a renamed module in a new
    transformers release shows up here, with the name that is missing).
    """
    layer_lists = _layer_lists(model, spec.layers)
    if not layer_lists:
        raise UnknownArchitecture(f"no layer list named {' or '.join(spec.layers)} in {type(model).__name__}")
    layers: list[LayerSites] = []
    for list_name, layer_list in layer_lists:
        for i, layer in enumerate(layer_list):
            path = f"{list_name}.{i}" if list_name else str(i)
            modules = _modules_of(layer)
            picked, names = {}, {}
            for role in ("attn_out", "ffn_in", "ffn_out"):
                candidates = getattr(spec, role)
                hit = _first(modules, candidates)
                if hit is None:
                    raise UnknownArchitecture(
                        f"{type(model).__name__}: layer {path} has none of {candidates} ({role}); "
                        f"update its row in adapterkit/sites.py"
                    )
                names[role], picked[role] = hit
            # An Identity standing in for a norm (ModernBERT's first layer) is no norm: nothing to train.
            norms = [(n, modules[n]) for n in spec.norms if n in modules and not isinstance(modules[n], nn.Identity)]
            sites = LayerSites(len(layers), path, picked["attn_out"], picked["ffn_in"], picked["ffn_out"], norms)
            for role in PROJECTION_ROLES:
                hit = _first(modules, getattr(spec, role))
                if hit is not None:
                    names[role] = hit[0]
                setattr(sites, role, None if hit is None else hit[1])
            fused = {}
            qkv = _first(modules, spec.attn_qkv)
            if qkv is not None and sites.attn_q is None:
                fused[qkv] = _qkv_parts(model, spec, f"{path}.{qkv[0]}", qkv[1], picked["attn_out"])
            gate_up = _first(modules, spec.ffn_gate_up)
            if gate_up is not None and sites.ffn_up is None:
                half = _halves(f"{path}.{gate_up[0]}", gate_up[1])
                fused[gate_up] = {"ffn_gate": Part(1, 2 * half, 0, half), "ffn_up": Part(1, 2 * half, half, 2 * half)}
            for (name, module), parts in fused.items():
                for role, part in parts.items():
                    setattr(sites, role, module)
                    sites.parts[role] = part
                    names[role] = name
            sites.names = names
            sites.flat = frozenset([r for r, n in names.items() if n in spec.flat] + [n for n, _ in norms if n in spec.flat])
            layers.append(sites)
    return layers


def _halves(where: str, module: nn.Module) -> int:
    """Each half's width of a fused [gate; up] projection."""
    width = linear_dims(module)[1]
    if width % 2:
        raise UnknownArchitecture(f"{where} has {width} outputs, not [gate; up] halves")
    return width // 2


def _qkv_parts(model: nn.Module, spec: SiteSpec, where: str, fused: nn.Module, attn_out: nn.Module) -> dict[str, Part]:
    """Each of q, k, v's rows of a fused projection's output (see the module docstring): q as wide as
    the attention output projection's input, k and v halves of the rest, laid out in ``qkv_groups``
    blocks of ``qkv_order``."""
    width = linear_dims(fused)[1]
    q = linear_dims(attn_out)[0]  # heads x head dim: what the output projection reads
    kv, odd = divmod(width - q, 2)
    groups = spec.qkv_groups
    if groups == "kv_heads":  # q = H D and k = G D: G = k H / q
        heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
        groups = kv * heads // q if isinstance(heads, int) and q and kv * heads % q == 0 else 0
    if kv <= 0 or odd or not groups or q % groups or kv % groups:
        raise UnknownArchitecture(
            f"{type(model).__name__}: {where} has {width} outputs, which do not split into queries of {q} (the "
            f"attention output's input) and equal keys and values in {spec.qkv_groups} block(s); check qkv_groups")
    sizes = {"q": q // groups, "k": kv // groups, "v": kv // groups}
    parts, start = {}, 0
    for letter in spec.qkv_order:
        parts[f"attn_{letter}"] = Part(groups, width // groups, start, start + sizes[letter])
        start += sizes[letter]
    return parts


def _score(model: nn.Module, spec: SiteSpec) -> tuple[int, int] | None:
    """(layers, norms) a row resolves on ``model``; None when it does not resolve fully."""
    try:
        layers = find_layers(model, spec)
    except UnknownArchitecture:
        return None
    return len(layers), sum(len(ls.norms) for ls in layers)


def guess_sites(model: nn.Module) -> SiteSpec:
    """The known row that fits ``model`` best: of the rows whose modules all resolve, the one that
    resolves the most layers, then the most norms (so Houlsby's norm training is not silently lost).
    When none fits, the error lists what the model has, so a user can write a SiteSpec."""
    best, best_score = None, None
    for spec in dict.fromkeys(SITES.values()):  # unique rows, table order breaks ties
        score = _score(model, spec)
        if score is not None and (best_score is None or score > best_score):
            best, best_score = spec, score
    if best is None:
        raise UnknownArchitecture(
            f"none of adapterkit's known module layouts matches {type(model).__name__}; pass "
            f"sites=SiteSpec(...) naming its modules. What it has:\n{describe_layers(model)}"
        )
    return best


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or "norm" in type(module).__name__.lower()


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D is a linear layer with transposed weights
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "FalconLinear")


def describe_layers(model: nn.Module, limit: int = 40) -> str:
    """What a SiteSpec could name in ``model``: its layer lists (ModuleLists of blocks) and, for the
    first, layer 0's linear modules and norms."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and len(list(m[0].children())) > 1]
    if not lists:
        return "  no ModuleList of layers found"
    lines = ["  layer lists: " + ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in lists[:8])]
    name, first = lists[0]
    linears = [f"{n} ({type(m).__name__})" for n, m in first[0].named_modules() if n and _is_linear(m)]
    norms = [f"{n} ({type(m).__name__})" for n, m in first[0].named_modules() if n and _is_norm(m)]
    lines.append(f"  {name}.0 linear modules: " + (", ".join(linears[:limit]) or "none"))
    lines.append(f"  {name}.0 norms: " + (", ".join(norms[:limit]) or "none"))
    return "\n".join(lines)


def describe_sites(model_type: str, spec: SiteSpec, layers: list[LayerSites]) -> str:
    """A human-readable account of where adapters attach (``AdapterModel.sites_report()``)."""
    if SITES.get(model_type) == spec:
        how = f"the site table's row for {model_type!r}"
    else:
        rows = sorted(t for t, s in SITES.items() if s == spec)
        how = f"guessed: the row of {', '.join(rows)}" if rows else "a SiteSpec given by the caller"
    lines = [f"{model_type}: {len(layers)} layers, sites from {how}"]
    if spec.shared:
        lines.append("  shared layers: each runs at several depths; one adapter per shared layer, applied at every depth")
    for ls in layers:
        norms = ", ".join(n for n, _ in ls.norms) or "NONE (layer-norm training has nothing to train here)"
        flat = f"; flattened (B·T, d): {', '.join(sorted({ls.names.get(f, f) for f in ls.flat}))}" if ls.flat else ""
        lines.append(
            f"  {ls.index:>3} {ls.path}: attn_out={ls.names.get('attn_out')} ffn_in={ls.names.get('ffn_in')} "
            f"ffn_out={ls.names.get('ffn_out')} norms=[{norms}]{flat}"
        )
    return "\n".join(lines)


def backbone(model: nn.Module) -> nn.Module:
    """The module whose output has ``last_hidden_state`` (what task heads read). Usually
    ``model.base_model``; where that is the LM itself (gemma3_text in transformers 4.57, whose
    ``base_model_prefix`` names no attribute), the decoder stack inside it."""
    base = getattr(model, "base_model", model)
    config = getattr(model, "config", None)
    if base is model and hasattr(model, "get_decoder") and not getattr(config, "is_encoder_decoder", False):
        decoder = model.get_decoder()
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    return base


def apply_at_site(route: Any, layer: int, position: str, out: Any, flat: bool) -> Any:
    """``route.apply_site`` on a hooked module's output, whatever its form: the first element of a
    tuple (4.57's mixture-of-experts blocks return ``(hidden, router_logits)``), and for a module
    declared ``flat``, its ``(B·T, d)`` output viewed as ``(B, T, d)`` (each row's tokens are one
    contiguous block) so a mixed batch gives each row its own adapter. None leaves ``out`` as it is."""
    head = out[0] if isinstance(out, tuple) else out
    x = head
    if flat and route.single is None:  # one adapter for every row needs no row structure
        x = head.reshape(len(route.rows), -1, head.shape[-1])
    new = route.apply_site(layer, position, x)
    if new is None:
        return None
    new = new.reshape(head.shape)
    return (new, *out[1:]) if isinstance(out, tuple) else new


def probe_weight(module: nn.Module) -> Any:
    """A module's own weight for the base-model fingerprint: ``.weight`` when it has one, else its
    first parameter (ViT's patch embedding is a module around a convolution; a mixture-of-experts
    block holds a router and experts)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter | Tensor):
        return weight
    for _, p in module.named_parameters():
        return p
    raise UnknownArchitecture(f"{type(module).__name__} has no parameters to fingerprint the base model by")


def architectures_markdown() -> str:
    """docs/architectures.md's site table (``coverage.architectures_page`` adds the kinds each row
    takes; ``python -m adapterkit.coverage`` writes the page, a test keeps it equal)."""
    lines = [
        "# Supported architectures",
        "",
        "Generated from the site table in `src/adapterkit/sites.py` by `python -m adapterkit.coverage`; do not",
        "edit by hand. Every row is tested on a tiny random model of its architecture under transformers",
        "4.57.6 and 5.x (`tests/core/test_architectures.py`): attach with the dry-pass verification, no",
        "adapter == bare model (bit-identical), a mixed batch == each row alone, generate where the model",
        "generates, save / load, detach. Where two candidates are listed, the first that exists is used",
        "(transformers renames modules between releases). Any other model: `sites='guess'` or a `SiteSpec`;",
        "`model.sites_report()` says what was picked.",
        "",
        f"{len(SITES)} model types.",
        "",
        "| model_type | layers | attention out | FFN in | FFN out | norms | pooling | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(names: tuple[str, ...]) -> str:
        return " / ".join(f"`{n}`" for n in names) or "–"

    for model_type in sorted(SITES):
        spec = SITES[model_type]
        notes = []
        if spec.flat:
            notes.append(f"flattened (B·T, d): {', '.join(spec.flat)}")
        if spec.shared:
            notes.append("shared layer: one adapter, applied at every depth")
        if any(n in ("mlp", "block_sparse_moe") for n in spec.ffn_out):
            notes.append("mixture of experts: adapters on the whole block's output")
        lines.append(
            f"| {model_type} | {cell(spec.layers)} | {cell(spec.attn_out)} | {cell(spec.ffn_in)} | "
            f"{cell(spec.ffn_out)} | {cell(spec.norms)} | {spec.pooling or '–'} | {'; '.join(notes)} |"
        )
    lines += ["", "## Refused", ""]
    lines += [f"- **{t}**: {why}." for t, why in sorted(REFUSED.items())]
    return "\n".join(lines) + "\n"

