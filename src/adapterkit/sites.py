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

Adding an architecture is one more row; ``tests/test_sites.py`` checks every row on a tiny model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


_BERT_LIKE = SiteSpec(
    layers=("encoder.layer",),
    attn_out=("attention.output.dense",),
    ffn_in=("intermediate",),
    ffn_out=("output.dense",),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
)
_LLAMA_LIKE = SiteSpec(
    layers=("layers",),
    attn_out=("self_attn.o_proj",),
    ffn_in=("mlp",),
    ffn_out=("mlp.down_proj",),
    norms=("input_layernorm", "post_attention_layernorm"),
    pooling="last",
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
    ),
    "mpnet": SiteSpec(
        layers=("encoder.layer",),
        attn_out=("attention.attn.o",),
        ffn_in=("intermediate",),
        ffn_out=("output.dense",),
        norms=("attention.LayerNorm", "output.LayerNorm"),
    ),
    "gpt2": SiteSpec(
        layers=("h",),
        attn_out=("attn.c_proj",),
        ffn_in=("mlp",),
        ffn_out=("mlp.c_proj",),
        norms=("ln_1", "ln_2"),
        pooling="last",
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
    ),
    "bart": SiteSpec(
        layers=("encoder.layers", "decoder.layers"),
        attn_out=("self_attn.out_proj",),
        ffn_in=("fc1",),
        ffn_out=("fc2",),
        norms=("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
        pooling=None,
    ),
    "vit": SiteSpec(
        layers=("encoder.layer", "layers"),  # 4.57: encoder.layer; 5.x: layers
        attn_out=("attention.output.dense", "attention.o_proj"),
        ffn_in=("intermediate", "mlp"),
        ffn_out=("output.dense", "mlp.fc2"),
        norms=("layernorm_before", "layernorm_after"),
    ),
}


@dataclass
class LayerSites:
    """The modules of one transformer layer that adapters attach to."""

    index: int
    path: str
    attn_out: nn.Module
    ffn_in: nn.Module
    ffn_out: nn.Module
    norms: list[tuple[str, nn.Module]]


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
            layers.append(LayerSites(len(layers), path, picked["attn_out"], picked["ffn_in"], picked["ffn_out"], norms))
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
