"""Where adapters go in each architecture: one row of module names per ``config.model_type``.

A row names, relative to one transformer layer, the modules adapterkit hooks into. Each entry is a
tuple of candidates, because transformers renames modules between releases (ViT's 4.57
``attention.output.dense`` is 5.x's ``attention.o_proj``): the first candidate that exists is used.

- ``layers``: the ModuleList(s) holding the transformer layers (name suffixes). In encoder-decoder
  models the decoder's layers are numbered after the encoder's.
- ``attn_out``: the attention block's output projection (serial adapters act on its output).
- ``ffn_in``: the module whose first input is the feed-forward block's input (feeds parallel adapters).
- ``ffn_out``: the feed-forward block's output projection.
- ``norms``: the layer's norms (every candidate that exists is used), whose affines a task may train.
- ``pooling``: which token a sequence-classification head reads: ``first`` (encoders, [CLS]),
  ``last`` (decoders: the last non-padding token) or ``None`` (no classification heads).

Optional roles, for the kinds that act on projections inside a sublayer (LoRA, IA3); a row without
them still serves the bottleneck kinds, and a kind that targets a role the row lacks says so:

- ``attn_q`` / ``attn_k`` / ``attn_v``: the self-attention's query, key and value projections.
- ``attn_qkv``: one fused projection whose output is [q; k; v] in equal thirds (GPT-2's ``c_attn``),
  for rows without separate ones; each of q, k, v then acts on its third of the output.
- ``ffn_up``: the FFN's input projection (``up_proj`` of a gated FFN); ``ffn_gate``: its gate
  projection, where the FFN is gated.

Adding an architecture is one more row; ``tests/test_sites.py`` checks every row on a tiny model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

SITES_VERSION = 1


@dataclass(frozen=True)
class SiteSpec:
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
    ffn_up: tuple[str, ...] = ()
    ffn_gate: tuple[str, ...] = ()


_BERT_LIKE = SiteSpec(
    layers=("encoder.layer",),
    attn_out=("attention.output.dense",),
    ffn_in=("intermediate",),
    ffn_out=("output.dense",),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    attn_q=("attention.self.query", "attention.self.query_proj"),  # deberta-v2: *_proj
    attn_k=("attention.self.key", "attention.self.key_proj"),
    attn_v=("attention.self.value", "attention.self.value_proj"),
    ffn_up=("intermediate.dense",),
)
_LLAMA_LIKE = SiteSpec(
    layers=("layers",),
    attn_out=("self_attn.o_proj",),
    ffn_in=("mlp",),
    ffn_out=("mlp.down_proj",),
    norms=("input_layernorm", "post_attention_layernorm"),
    pooling="last",
    attn_q=("self_attn.q_proj",),
    attn_k=("self_attn.k_proj",),
    attn_v=("self_attn.v_proj",),
    ffn_up=("mlp.up_proj",),
    ffn_gate=("mlp.gate_proj",),
)

SITES: dict[str, SiteSpec] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "distilbert": SiteSpec(
        layers=("transformer.layer",),
        attn_out=("attention.out_lin",),
        ffn_in=("ffn",),
        ffn_out=("ffn.lin2",),
        norms=("sa_layer_norm", "output_layer_norm"),
        attn_q=("attention.q_lin",),
        attn_k=("attention.k_lin",),
        attn_v=("attention.v_lin",),
        ffn_up=("ffn.lin1",),
    ),
    "mpnet": SiteSpec(
        layers=("encoder.layer",),
        attn_out=("attention.attn.o",),
        ffn_in=("intermediate",),
        ffn_out=("output.dense",),
        norms=("attention.LayerNorm", "output.LayerNorm"),
        attn_q=("attention.attn.q",),
        attn_k=("attention.attn.k",),
        attn_v=("attention.attn.v",),
        ffn_up=("intermediate.dense",),
    ),
    "gpt2": SiteSpec(
        layers=("h",),
        attn_out=("attn.c_proj",),
        ffn_in=("mlp",),
        ffn_out=("mlp.c_proj",),
        norms=("ln_1", "ln_2"),
        pooling="last",
        attn_qkv=("attn.c_attn",),
        ffn_up=("mlp.c_fc",),
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "t5": SiteSpec(
        layers=("encoder.block", "decoder.block"),
        attn_out=("layer.0.SelfAttention.o",),
        ffn_in=("layer.2.DenseReluDense", "layer.1.DenseReluDense"),  # decoder first: it has 3 sublayers
        ffn_out=("layer.2.DenseReluDense.wo", "layer.1.DenseReluDense.wo"),
        norms=("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm"),
        pooling=None,
        attn_q=("layer.0.SelfAttention.q",),
        attn_k=("layer.0.SelfAttention.k",),
        attn_v=("layer.0.SelfAttention.v",),
        # decoder blocks first (their FFN is layer.2); gated FFNs (T5 v1.1): wi_1 is up, wi_0 the gate
        ffn_up=("layer.2.DenseReluDense.wi", "layer.1.DenseReluDense.wi",
                "layer.2.DenseReluDense.wi_1", "layer.1.DenseReluDense.wi_1"),
        ffn_gate=("layer.2.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_0"),
    ),
    "bart": SiteSpec(
        layers=("encoder.layers", "decoder.layers"),
        attn_out=("self_attn.out_proj",),
        ffn_in=("fc1",),
        ffn_out=("fc2",),
        norms=("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
        pooling=None,
        attn_q=("self_attn.q_proj",),
        attn_k=("self_attn.k_proj",),
        attn_v=("self_attn.v_proj",),
        ffn_up=("fc1",),
    ),
    "vit": SiteSpec(
        layers=("encoder.layer", "layers"),  # 4.57: encoder.layer; 5.x: layers
        attn_out=("attention.output.dense", "attention.o_proj"),
        ffn_in=("intermediate", "mlp"),
        ffn_out=("output.dense", "mlp.fc2"),
        norms=("layernorm_before", "layernorm_after"),
        attn_q=("attention.attention.query", "attention.q_proj"),
        attn_k=("attention.attention.key", "attention.k_proj"),
        attn_v=("attention.attention.value", "attention.v_proj"),
        ffn_up=("intermediate.dense", "mlp.fc1"),
    ),
}


# Optional roles (see the module docstring): resolved when the row names them, else None.
PROJECTION_ROLES = ("attn_q", "attn_k", "attn_v", "ffn_up", "ffn_gate")


@dataclass
class LayerSites:
    """The modules of one transformer layer that adapters attach to.

    ``slices`` maps a role served by a part of a fused module's output (GPT-2's ``c_attn`` for
    ``attn_q`` / ``attn_k`` / ``attn_v``) to that part's columns.
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
    slices: dict[str, slice] = field(default_factory=dict)

    def dims(self, role: str) -> tuple[int, int] | None:
        """(in_features, out_features) of the projection playing ``role`` (its part, for a fused
        one); None where this layer has no such module."""
        module = getattr(self, role, None)
        if module is None:
            return None
        n_in, n_out = linear_dims(module)
        part = self.slices.get(role)
        if part is not None:
            n_out = part.stop - part.start
        return n_in, n_out


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
    try:
        return SITES[model_type]
    except KeyError:
        raise UnknownArchitecture(
            f"adapterkit has no site table row for model_type {model_type!r}. Add one to SITES in "
            f"adapterkit/sites.py (the modules of one layer: attention output projection, FFN input, FFN "
            f"output projection, layer norms), pass sites=SiteSpec(...) yourself, or pass sites='guess' to "
            f"try the known rows' module names on this model. Known: {', '.join(sorted(SITES))}"
        ) from None


def _first(layer: nn.Module, candidates: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    modules = dict(layer.named_modules())
    for name in candidates:
        if name in modules:
            return name, modules[name]
    return None


def _layer_lists(model: nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, nn.ModuleList]]:
    pattern = re.compile(r"(?:^|\.)(?:" + "|".join(re.escape(s) for s in suffixes) + r")$")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and pattern.search(n)]
    return found


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
            picked = {}
            for role in ("attn_out", "ffn_in", "ffn_out"):
                candidates = getattr(spec, role)
                hit = _first(layer, candidates)
                if hit is None:
                    raise UnknownArchitecture(
                        f"{type(model).__name__}: layer {path} has none of {candidates} ({role}); "
                        f"update its row in adapterkit/sites.py"
                    )
                picked[role] = hit[1]
            modules = dict(layer.named_modules())
            norms = [(n, modules[n]) for n in spec.norms if n in modules]
            sites = LayerSites(len(layers), path, picked["attn_out"], picked["ffn_in"], picked["ffn_out"], norms)
            for role in PROJECTION_ROLES:
                hit = _first(layer, getattr(spec, role))
                setattr(sites, role, None if hit is None else hit[1])
            fused = _first(layer, spec.attn_qkv)
            if fused is not None and sites.attn_q is None:
                width = linear_dims(fused[1])[1]
                if width % 3:
                    raise UnknownArchitecture(f"{type(model).__name__}: {path}.{fused[0]} has {width} outputs, not [q; k; v] thirds")
                third = width // 3
                for k, role in enumerate(("attn_q", "attn_k", "attn_v")):
                    setattr(sites, role, fused[1])
                    sites.slices[role] = slice(k * third, (k + 1) * third)
            layers.append(sites)
    return layers


def guess_sites(model: nn.Module) -> SiteSpec:
    """Try every known row's module names on ``model``; return the first that resolves fully."""
    for spec in dict.fromkeys(SITES.values()):  # unique rows, table order
        try:
            if find_layers(model, spec):
                return spec
        except UnknownArchitecture:
            continue
    raise UnknownArchitecture(
        f"none of adapterkit's known module layouts matches {type(model).__name__}; "
        f"pass sites=SiteSpec(...) naming its modules"
    )
