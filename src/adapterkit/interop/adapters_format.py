"""The adapters library's (AdapterHub) saved folders: bottleneck adapters and their heads, both ways.

A folder ``model.save_adapter(dir, name)`` wrote holds ``adapter_config.json`` (``{"config": {...},
"name", "model_type", "hidden_size", "model_class", "version"}``), the weights
(``adapter.safetensors`` or the pickle ``pytorch_adapter.bin``, read only with
``torch.load(weights_only=True)``) and, with a head, ``head_config.json`` and
``model_head.safetensors`` / ``pytorch_model_head.bin``.

The maths (adapters 1.3, ``methods/modeling.py`` ``Adapter`` / ``ParallelAdapter``, and BERT's
``BertSelfOutputWithAdapters`` / ``BertOutputWithAdapters``): a sublayer computes
``h = dropout(dense(x))`` and hands ``h``, its residual input ``r`` and its LayerNorm to the adapter.

- serial (``double_seq_bn``, ``seq_bn`` with ``original_ln_before=False``):
  ``LN(h + s * up(act(down(h))) + r)``. adapterkit's serial kinds hook the projection's output,
  before the dropout: in eval mode (dropout the identity) that is the same expression. Houlsby
  (``mh_adapter`` and ``output_adapter``) is ``houlsby``, the output adapter alone ``pfeiffer``, the
  attention one alone ``serial_attention``; none trains the model's layer norms.
- ``original_ln_before=True`` (``seq_bn``'s default, Pfeiffer's placement) feeds the adapter
  ``LN(h + r)`` and adds it before a second ``LN``: no adapterkit kind computes that, so it is refused.
- parallel (``par_bn``): ``LN(h + s * up(act(down(r))) + r)``, ``r`` the FFN block's input: adapterkit's
  ``parallel`` kind (fed by the FFN's input).
- ``scaling`` ``"learned"`` / ``"channel"`` is folded into the up projection (exact up to rounding).
- A bottleneck narrower in some layers (a per-layer ``reduction_factor``) is zero-padded to the widest
  (exact: padded units are zero in and out, and every supported activation maps 0 to 0).
- Heads: ``classification`` with 2 layers and tanh (dropout, dense, tanh, dropout, out on the first
  token) is adapterkit's classification head; ``tagging`` with 1 layer its token-classification head.

Verified (tests/interop) on BERT-family layer code; other model types are refused rather than assumed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..artifact import MAX_BOTTLENECK_SIZE
from ..atomic_io import atomic_write_bytes
from ..config import AdapterConfig, is_finite_number
from .card import exported_base_id
from .converted import Converted, labels_for, load_weight_file, read_json_object
from .module_map import InteropError, ModuleMap

if TYPE_CHECKING:
    from ..model import AdapterModel

CONFIG_NAME = "adapter_config.json"
HEAD_CONFIG_NAME = "head_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
LIBRARY_VERSION = "adapters.1.3.0"  # the release whose format this follows

# model types whose layer code in the adapters library calls the bottleneck as BERT's does (above)
VERIFIED_MODEL_TYPES = ("bert",)

_ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "tanh": "tanh"}
_ACTIVATION_NAMES = {"relu": "relu", "silu": "swish", "gelu": "gelu", "tanh": "tanh"}

# BnConfig options that must have this value for an exact mapping (else refused by name)
_REQUIRED = {
    "ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False, "inv_adapter": None,
    "cross_adapter": False, "stochastic_depth": 0.0, "original_ln_after": True,
}
_KINDS = {  # (is_parallel, mh_adapter, output_adapter) -> adapterkit kind
    (False, True, True): "houlsby",
    (False, False, True): "pfeiffer",
    (False, True, False): "serial_attention",
    (True, False, True): "parallel",
}
_FLAGS = {kind: flags for flags, kind in _KINDS.items()}


def is_adapters_folder(folder: Path) -> bool:
    """A folder the adapters library saved: ``adapter_config.json`` with its ``config`` and ``version``."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and "peft_type" not in data


def read_adapters(folder: str | Path, model: AdapterModel, labels: list[str] | None = None) -> Converted:
    """Translate an adapters-library folder (a bottleneck adapter, optionally with its head) for
    ``model``; InteropError naming the option that does not map exactly."""
    folder = Path(folder)
    meta = _read_json(folder / CONFIG_NAME)
    config, name = meta["config"], meta.get("name")
    architecture = config.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise InteropError(f"{folder}: adapters-library architecture {architecture!r} is not supported "
                           "(bottleneck adapters are: double_seq_bn, seq_bn, par_bn)")
    model_type = model.base.config.model_type
    if model_type not in VERIFIED_MODEL_TYPES:
        raise InteropError(f"{folder}: bottleneck adapters on {model_type!r} are not supported yet: the adapters "
                           f"library's placement was verified on {', '.join(VERIFIED_MODEL_TYPES)}")
    if meta.get("model_type") not in (None, model_type):
        raise InteropError(f"{folder}: saved for model_type {meta.get('model_type')!r}, this model is {model_type!r}")
    weights = load_weight_file(folder, WEIGHTS)
    converted = _read_bottleneck(config, name, weights, ModuleMap(model), model)
    converted.name = name
    converted.source = {"format": "adapters", "version": meta.get("version"), "model_name": meta.get("model_name")}
    if (folder / HEAD_CONFIG_NAME).is_file():
        head, tensors, head_labels = _read_head(folder, model, labels)
        converted.head, converted.labels = head, head_labels
        converted.tensors.update(tensors)
    return converted


# -- reading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json_object(path)
    if not isinstance(data.get("config"), dict):
        raise InteropError(f"{path}: not an adapters-library config (no 'config' object)")
    return data


def _read_bottleneck(config: dict[str, Any], name: str | None, weights: dict[str, torch.Tensor], mmap: ModuleMap,
                     model: AdapterModel) -> Converted:
    for key, value in _REQUIRED.items():
        if config.get(key, value) != value and not (value is None and not config.get(key)):
            raise InteropError(f"adapters-library option {key}={config.get(key)!r} has no exact adapterkit equivalent")
    for key in ("is_parallel", "mh_adapter", "output_adapter"):
        if not isinstance(config.get(key, False), bool | None):
            raise InteropError(f"adapters-library option {key}={str(config.get(key))[:40]!r} must be true or false")
    flags = (bool(config.get("is_parallel", False)), bool(config.get("mh_adapter")), bool(config.get("output_adapter")))
    kind = _KINDS.get(flags)
    if kind is None:
        raise InteropError(f"adapters-library placement is_parallel={flags[0]}, mh_adapter={flags[1]}, output_adapter={flags[2]} "
                           "has no adapterkit kind")
    if not flags[0] and config.get("original_ln_before"):
        raise InteropError("adapters-library option original_ln_before=True (seq_bn's default, Pfeiffer's placement) feeds "
                           "the adapter the sublayer's normed output and norms again; adapterkit's serial kinds add to the "
                           "projection's output before the norm, so it cannot be mapped exactly (original_ln_before=False can)")
    activation = _ACTIVATIONS.get(str(config.get("non_linearity", "")).lower())
    if activation is None:
        raise InteropError(f"adapters-library option non_linearity={config.get('non_linearity')!r} has no adapterkit "
                           f"equivalent (relu, swish, gelu, tanh do)")
    scaling = config.get("scaling", 1.0)
    learned = scaling in ("learned", "channel")
    if not learned and not is_finite_number(scaling, positive=True):
        raise InteropError(f"adapters-library option scaling={str(scaling)[:40]!r} is not supported (a finite "
                           "positive number, 'learned' or 'channel' are)")
    dropout = config.get("dropout", 0.0) or 0.0
    if not is_finite_number(dropout) or not 0 <= dropout < 1:
        raise InteropError(f"adapters-library option dropout={str(dropout)[:40]!r} must be a number in [0, 1)")
    # group tensors by the module the adapter sits in: "<module>.adapters.<name>.<param>"
    sites: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    prefix = mmap.prefix + "." if mmap.prefix else ""
    for key in list(weights):
        marker = ".adapters."
        if marker not in key:
            raise InteropError(f"tensor {key!r} is no bottleneck adapter weight (invertible adapters and fusion are not supported)")
        module, rest = key.split(marker, 1)
        if "." not in rest:
            raise InteropError(f"tensor {key[:120]!r} is no bottleneck adapter weight (<module>.adapters.<name>.<param>)")
        _, param = rest.split(".", 1)
        module = module[len(prefix):] if prefix and module.startswith(prefix) else module
        position = _position_of(module, mmap, kind)
        sites.setdefault(position, {})[param] = weights.pop(key)
    positions = _KIND_POSITIONS[kind]
    d = model.hidden_size
    width = 0
    for (layer, position), params in sites.items():
        expected = {"adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"} | (
            {"scaling"} if learned else set())
        if set(params) != expected:
            raise InteropError(f"layer {layer} {position}: adapter tensors {sorted(params)}; expected {sorted(expected)}")
        # every shape checked before the zero padding to the widest bottleneck is allocated
        down, up = params["adapter_down.0.weight"], params["adapter_up.weight"]
        r = down.shape[0] if down.dim() == 2 else 0
        shapes_fit = (down.shape == (r, d) and up.shape == (d, r) and params["adapter_down.0.bias"].shape == (r,)
                      and params["adapter_up.bias"].shape == (d,)
                      and (not learned or params["scaling"].shape in ((1,), (d,))))
        if not shapes_fit or not 1 <= r <= MAX_BOTTLENECK_SIZE:
            raise InteropError(f"layer {layer} {position}: down {tuple(down.shape)}, up {tuple(up.shape)} are not "
                               f"(r, {d}) and ({d}, r) with 1 <= r <= {MAX_BOTTLENECK_SIZE}, or their biases or "
                               "scaling do not fit")
        width = max(width, r)
    if not sites:
        raise InteropError("no adapter weights in the folder")
    layers = sorted({layer for layer, _ in sites})
    cfg = AdapterConfig(kind, bottleneck_size=width, activation=activation, dropout=float(dropout),
                        scaling=1.0 if learned else float(scaling), train_layer_norms=False,
                        leave_out=[i for i in range(model.num_layers) if i not in layers])
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        for position in positions:
            params = sites.get((layer, position))
            if params is None:
                raise InteropError(f"layer {layer} has an adapter at some positions of {kind} but not at {position}")
            down_w, down_b = params["adapter_down.0.weight"].float(), params["adapter_down.0.bias"].float()
            up_w, up_b = params["adapter_up.weight"].float(), params["adapter_up.bias"].float()
            if learned:  # (1,) or (d,): scales the up projection's output; folded into its weights
                s = params["scaling"].float()
                up_w, up_b = up_w * s.reshape(-1, 1), up_b * s.reshape(-1)
            r = down_w.shape[0]
            tensors[f"layers.{layer}.{position}.down.weight"] = torch.cat([down_w, torch.zeros(width - r, d)])
            tensors[f"layers.{layer}.{position}.down.bias"] = torch.cat([down_b, torch.zeros(width - r)])
            tensors[f"layers.{layer}.{position}.up.weight"] = torch.cat([up_w, torch.zeros(d, width - r)], dim=1)
            tensors[f"layers.{layer}.{position}.up.bias"] = up_b
    return Converted(cfg, None, [], tensors)


_KIND_POSITIONS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",), "serial_attention": ("attn",), "parallel": ("ffn",)}


def _position_of(module: str, mmap: ModuleMap, kind: str) -> tuple[int, str]:
    """(layer, position) of the sublayer module holding an adapter: the parent of the attention's or the
    FFN's output projection (BERT's ``attention.output`` / ``output``)."""
    for position in ("attn", "ffn"):
        for (layer, pos), target in mmap.by_site.items():
            if pos == position and target.module.rsplit(".", 1)[0] == module:
                return layer, position
    raise InteropError(f"adapter in module {module!r}, which holds neither the attention's nor the FFN's output projection here")


def _read_head(folder: Path, model: AdapterModel, labels: list[str] | None) -> tuple[str, dict, list[str]]:
    meta = _read_json(folder / HEAD_CONFIG_NAME)
    cfg, name = meta["config"], meta.get("name")
    weights = load_weight_file(folder, HEAD_WEIGHTS)
    prefix = f"heads.{name}."
    params = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if len(params) != len(weights):
        raise InteropError(f"{folder}: head tensors not under {prefix!r}: {sorted(set(weights) - {prefix + k for k in params})[:3]}")
    head_type, layers = cfg.get("head_type"), cfg.get("layers")
    if cfg.get("bias", True) is not True:
        raise InteropError("adapters-library head option bias=False has no adapterkit equivalent")
    label2id = cfg.get("label2id")
    if head_type == "classification":
        if layers != 2 or str(cfg.get("activation_function")).lower() != "tanh" or cfg.get("use_pooler"):
            raise InteropError(f"adapters-library classification head layers={layers}, activation_function="
                               f"{cfg.get('activation_function')!r}, use_pooler={cfg.get('use_pooler')}: adapterkit's is "
                               "layers=2, tanh, use_pooler=False")
        if model.sites.pooling != "first":
            raise InteropError("a classification head on the first token needs a model that pools it")
        tensors = {"head.dense.weight": params.pop("1.weight"), "head.dense.bias": params.pop("1.bias"),
                   "head.out.weight": params.pop("4.weight"), "head.out.bias": params.pop("4.bias")}
        task = "classification"
    elif head_type == "tagging":
        if layers != 1:
            raise InteropError(f"adapters-library tagging head layers={layers}: adapterkit's token head is layers=1")
        tensors = {"head.out.weight": params.pop("1.weight"), "head.out.bias": params.pop("1.bias")}
        task = "token_classification"
    else:
        raise InteropError(f"adapters-library head_type {head_type!r} has no adapterkit head (classification, tagging do)")
    if params:
        raise InteropError(f"{folder}: head tensors with no adapterkit equivalent: {sorted(params)}")
    n = tensors["head.out.weight"].shape[0]
    if labels is None and isinstance(label2id, dict) and len(label2id) == n:
        labels = [k for k, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    return task, tensors, labels_for(model, n, labels)


# -- writing -------------------------------------------------------------------------------------


def write_adapters(model: AdapterModel, name: str, out: str | Path) -> Path:
    """Write bottleneck adapter ``name`` (and its head) as a folder that the adapters library's
    ``model.load_adapter(dir, use_safetensors=True)`` loads on the same base model."""
    from .peft_format import _refuse_norms

    adapter = model._get(name)
    cfg = adapter.config
    if cfg.kind not in _FLAGS:
        raise InteropError(f"adapter {name!r} is of kind {cfg.kind!r}; only the bottleneck kinds "
                           f"{', '.join(_FLAGS)} export to the adapters library")
    model_type = model.base.config.model_type
    if model_type not in VERIFIED_MODEL_TYPES:
        raise InteropError(f"export of bottleneck adapters on {model_type!r} is not supported yet (verified: {', '.join(VERIFIED_MODEL_TYPES)})")
    _refuse_norms(adapter, name, "the adapters library")
    mmap = ModuleMap(model)
    prefix = (mmap.prefix + ".") if mmap.prefix and getattr(model.base, mmap.prefix, None) is None else ""
    weights: dict[str, torch.Tensor] = {}
    for (layer, position), module in adapter._lookup().items():
        if not isinstance(position, str):
            continue
        owner = mmap.by_site[(layer, position)].module.rsplit(".", 1)[0]
        key = f"{prefix}{owner}.adapters.{name}"
        weights[f"{key}.adapter_down.0.weight"] = module.down.weight.detach().cpu().float()
        weights[f"{key}.adapter_down.0.bias"] = module.down.bias.detach().cpu().float()
        weights[f"{key}.adapter_up.weight"] = module.up.weight.detach().cpu().float()
        weights[f"{key}.adapter_up.bias"] = module.up.bias.detach().cpu().float()
    parallel, mh, output = _FLAGS[cfg.kind]
    d, r = model.hidden_size, cfg.bottleneck_for(model.hidden_size)
    config = {
        "architecture": None, "mh_adapter": mh, "output_adapter": output, "is_parallel": parallel,
        "reduction_factor": _reduction_factor(d, r), "non_linearity": _ACTIVATION_NAMES[cfg.activation],
        "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True,
        "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False, "init_weights": "bert",
        "init_weights_seed": None, "scaling": cfg.scaling, "use_gating": False, "dropout": cfg.dropout,
        "leave_out": list(cfg.leave_out), "phm_layer": False, "inv_adapter": None, "inv_adapter_reduction_factor": None,
        "cross_adapter": False, "stochastic_depth": 0.0,
    }
    common = {"hidden_size": d, "model_class": _model_class(model), "model_name": exported_base_id(model.base),
              "model_type": model_type, "name": name, "version": LIBRARY_VERSION}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS[0]), metadata={"format": "pt"})
    atomic_write_bytes(out / CONFIG_NAME, json.dumps({"config": config, **common}, indent=2, sort_keys=True).encode())
    if adapter.head is not None:
        _write_head(adapter, name, out, common)
    return out


def _reduction_factor(d: int, r: int) -> float:
    """A factor f with ``int(d // f) == r`` (how the adapters library sizes the bottleneck)."""
    f = d / r
    while int(d // f) < r:  # d / r rounded up in floating point: step below it
        f = math.nextafter(f, 0.0)
    if int(d // f) != r:
        raise InteropError(f"bottleneck width {r} is not reachable by a reduction factor of hidden size {d}")
    return f


def _model_class(model: AdapterModel) -> str:
    return type(model.base).__name__.replace("ForSequenceClassification", "").replace("Model", "") + "AdapterModel"


def _write_head(adapter, name: str, out: Path, common: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().float() for k, v in adapter.head.state_dict().items()}
    labels = list(adapter.task.get("labels") or [])
    head_type = adapter.task.get("type")
    if head_type == "classification":
        cfg = {"head_type": "classification", "num_labels": len(labels), "layers": 2, "activation_function": "tanh",
               "use_pooler": False, "bias": True, "dropout_prob": None}
        tensors = {f"heads.{name}.1.weight": state["dense.weight"], f"heads.{name}.1.bias": state["dense.bias"],
                   f"heads.{name}.4.weight": state["out.weight"], f"heads.{name}.4.bias": state["out.bias"]}
    elif head_type == "token_classification":
        cfg = {"head_type": "tagging", "num_labels": len(labels), "layers": 1, "activation_function": "tanh",
               "dropout_prob": None}
        tensors = {f"heads.{name}.1.weight": state["out.weight"], f"heads.{name}.1.bias": state["out.bias"]}
    else:
        raise InteropError(f"adapter {name!r} has a {head_type} head, which the adapters library's heads do not match")
    cfg["label2id"] = {label: i for i, label in enumerate(labels)}
    save_file(tensors, str(out / HEAD_WEIGHTS[0]), metadata={"format": "pt"})
    atomic_write_bytes(out / HEAD_CONFIG_NAME, json.dumps({"config": cfg, **common}, indent=2, sort_keys=True).encode())
