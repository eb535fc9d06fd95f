"""PEFT's saved folders (``adapter_config.json`` + ``adapter_model.safetensors``): LoRA and IA3, both ways.

What PEFT computes, and how it maps (PEFT 0.21; ``peft/tuners/lora/layer.py``, ``tuners/ia3/layer.py``):

- LoRA on a module: ``y = W x + b + s_m * B_m A_m dropout(x)``, ``A_m`` (r_m, in), ``B_m`` (out, r_m),
  ``s_m = alpha_m / r_m`` (``/ sqrt(r_m)`` with ``use_rslora``); ``r_m`` and ``alpha_m`` come from
  ``rank_pattern`` / ``alpha_pattern`` where a key matches, else ``r`` / ``lora_alpha``. adapterkit's
  LoRA is one rank and one scale per adapter, so modules are zero-padded to the widest rank (exact:
  padded units are zero in and out) and a module whose scale differs carries the ratio in ``B``.
  Positions the checkpoint leaves alone get ``B = 0`` (the identity, exactly). A fused projection
  (GPT-2's ``c_attn``: out = [q; k; v]) is one PEFT module but three adapterkit positions, each with
  the same ``A`` and its third of ``B``; exporting joins them back (``A`` stacked, ``B`` block-diagonal).
- DoRA (``use_dora``): PEFT's ``lora_magnitude_vector`` (out,) per module is adapterkit's
  ``magnitude`` (``AdapterConfig(dora=True)``), a fused module's split by thirds as ``B`` is (DoRA's
  norm is per output feature, so the thirds are independent). PEFT's maths (``tuners/lora/dora.py``):
  ``y = out + (g - 1) (out - b) + g s B A x``, ``g = m / ||W + s B A||`` per output row, the norm
  detached; while training with dropout the base term is ``W dropout(x)``, as adapterkit's. Positions
  the checkpoint leaves alone get ``B = 0`` and ``m = ||W||`` (the identity, exactly).
- IA3: ``ia3_l`` (out, 1) scales a module's output, (1, in) its input (``feedforward_modules``).
  adapterkit's positions: k, v (outputs) and ff (the input of the FFN's output projection).
- ``modules_to_save`` heads: a BERT-style sequence classifier (the base's pooler, dense + tanh on the
  first token, then ``classifier``) is adapterkit's classification head; a per-token ``classifier``
  is its token-classification head.

Anything else (trained biases, embedding LoRA or DoRA, other saved modules, other PEFT types) is
refused by name. ``.bin`` weights are pickles: read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..artifact import MAX_BOTTLENECK_SIZE
from ..atomic_io import atomic_write_bytes
from ..config import AdapterConfig, is_finite_number
from ..kinds import ia3 as ia3_kind
from ..kinds import lora as lora_kind
from ..kinds.interface import POSITIONS
from .card import exported_base_id
from .converted import Converted, labels_for, load_weight_file, read_json_object
from .module_map import InteropError, ModuleMap

if TYPE_CHECKING:
    from ..model import AdapterModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."

# PEFT LoRA options that change the maths and have no adapterkit equivalent: (key, value that is fine).
_LORA_REFUSED = (
    ("lora_bias", False), ("bias", "none"), ("layer_replication", None),
    ("target_parameters", None), ("trainable_token_indices", None), ("use_qalora", False),
    ("alora_invocation_tokens", None), ("megatron_config", None), ("use_bdlora", None), ("arrow_config", None),
)
_IA3_REFUSED = (("target_parameters", None),)


def is_peft_folder(folder: Path) -> bool:
    """A folder PEFT saved: its ``adapter_config.json`` has ``peft_type``."""
    config = read_json_object(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
    return isinstance(config, dict) and "peft_type" in config


def read_peft(folder: str | Path, model: AdapterModel, labels: list[str] | None = None) -> Converted:
    """Translate a PEFT LoRA or IA3 folder into adapterkit's terms for ``model`` (its base must be the
    model PEFT adapted, bare or with the task head PEFT wrapped). Raises InteropError naming what does
    not map exactly."""
    folder = Path(folder)
    config = read_json_object(folder / CONFIG_NAME)
    peft_type = config.get("peft_type")
    weights = _strip(load_weights(folder))
    mmap = ModuleMap(model)
    if peft_type == "LORA":
        _refuse(config, _LORA_REFUSED, "LoRA")
        converted = _read_lora(config, weights, mmap, model)
    elif peft_type == "IA3":
        _refuse(config, _IA3_REFUSED, "IA3")
        converted = _read_ia3(config, weights, mmap, model)
    else:
        raise InteropError(f"{folder}: PEFT type {peft_type!r} is not supported (LORA and IA3 are)")
    head, head_tensors, n = _read_head(config, weights, model)
    leftover = sorted(weights)
    if leftover:
        raise InteropError(f"{folder}: tensors with no adapterkit equivalent: {', '.join(leftover[:5])}")
    converted.head = head
    converted.tensors.update(head_tensors)
    converted.labels = labels_for(model, n, labels) if head else []
    converted.source = {"format": "peft", "peft_type": peft_type, "peft_version": config.get("peft_version"),
                        "base_model_name_or_path": config.get("base_model_name_or_path")}
    return converted


# -- reading -------------------------------------------------------------------------------------


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors``, else ``adapter_model.bin`` (tensors only, ``weights_only=True``)."""
    return load_weight_file(folder, WEIGHTS_NAMES)


def _strip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k: v for k, v in weights.items()}


def _refuse(config: dict[str, Any], refused: tuple, what: str) -> None:
    for key, fine in refused:
        value = config.get(key, fine)
        if value is not None and value is not False and value != fine and value not in ({}, []):
            raise InteropError(f"PEFT {what} option {key}={value!r} has no exact adapterkit equivalent")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the module name's end."""
    if not isinstance(patterns, dict | None):
        raise InteropError(f"PEFT pattern {str(patterns)[:80]!r} must be an object of module patterns")
    for key, value in (patterns or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise InteropError(f"PEFT pattern {key[:80]!r} is not a regular expression ({e})") from None
        if hit:
            return value
    return default


def _number(value: Any, what: str, positive: bool = True) -> float:
    """A config number: an int or float (not a bool), finite, and > 0 where ``positive``."""
    if not is_finite_number(value, positive=positive):
        raise InteropError(f"PEFT LoRA {what}={str(value)[:40]!r} must be a finite{' positive' if positive else ''} number")
    return float(value)


def _take(weights: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    """Pop every tensor whose name ends with ``suffix``, by module name."""
    found = {k[: -len(suffix)]: weights.pop(k) for k in [k for k in weights if k.endswith(suffix)]}
    return found


def _read_lora(config: dict[str, Any], weights: dict[str, torch.Tensor], mmap: ModuleMap, model: AdapterModel) -> Converted:
    a_by_module, b_by_module = _take(weights, ".lora_A.weight"), _take(weights, ".lora_B.weight")
    dora = config.get("use_dora", False)
    if not isinstance(dora, bool):
        raise InteropError(f"PEFT LoRA option use_dora={dora!r} must be true or false")
    # PEFT saves DoRA's magnitude as ``<module>.lora_magnitude_vector`` (older releases: ``.weight`` after it)
    m_by_module = _take(weights, ".lora_magnitude_vector.weight")
    m_by_module.update(_take(weights, ".lora_magnitude_vector"))
    embedding = [k for k in weights if ".lora_embedding_" in k]
    if embedding:
        raise InteropError(f"PEFT LoRA tensor {embedding[0]!r} (embedding LoRA) has no adapterkit equivalent")
    if set(a_by_module) != set(b_by_module) or not a_by_module:
        raise InteropError("PEFT LoRA weights need a lora_A and a lora_B for every module")
    if m_by_module and not dora:
        raise InteropError(f"PEFT LoRA tensor {next(iter(m_by_module))}.lora_magnitude_vector (DoRA) without use_dora")
    if dora and set(m_by_module) != set(a_by_module):
        lacking = sorted(set(a_by_module) - set(m_by_module)) or sorted(set(m_by_module) - set(a_by_module))
        raise InteropError(f"PEFT DoRA weights need a lora_magnitude_vector for every LoRA module (and no other); "
                           f"not so for {lacking[0]!r}")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InteropError(f"PEFT LoRA option use_rslora={str(rslora)[:40]!r} must be true or false")
    alpha0 = _number(config.get("lora_alpha", 8), "lora_alpha")
    dropout = _number(config.get("lora_dropout", 0.0) or 0.0, "lora_dropout", positive=False)
    if not 0 <= dropout < 1:
        raise InteropError(f"PEFT LoRA lora_dropout={dropout} must be in [0, 1)")
    sites: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    magnitudes: dict[tuple[int, str], torch.Tensor] = {}
    for module, a in a_by_module.items():
        b = b_by_module[module]
        m = m_by_module.get(module)
        if m is not None and (m.dim() != 1 or b.dim() != 2 or m.shape[0] != b.shape[0]):
            raise InteropError(f"PEFT DoRA magnitude of {module!r} has shape {tuple(m.shape)}; its lora_B has "
                               f"{tuple(b.shape)} (one magnitude per output feature)")
        targets = [t for t in mmap.targets(module) if t.position in lora_kind.TARGETS]
        if not targets:
            raise InteropError(f"PEFT LoRA targets module {module!r}, which is not one of adapterkit's LoRA positions "
                               f"({', '.join(lora_kind.TARGETS)}) on this model")
        # shapes before any use: A (r, in), B (out, r), 1 <= r <= the cap a loaded artifact has
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or not 1 <= a.shape[0] <= MAX_BOTTLENECK_SIZE:
            raise InteropError(f"PEFT LoRA of {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                               f"(r, in) and (out, r) with 1 <= r <= {MAX_BOTTLENECK_SIZE}")
        r = a.shape[0]
        alpha = _number(_pattern_value(config.get("alpha_pattern"), module, alpha0), f"alpha_pattern[{module!r}]")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        for t in targets:
            part = b if t.part is None else t.part.take(b, 0)
            sites[(t.layer, t.position)] = (a, part, scale)
            if m is not None:
                magnitudes[(t.layer, t.position)] = m if t.part is None else t.part.take(m, 0)
    rank = max(a.shape[0] for a, _, _ in sites.values())
    # the common scale: that of the widest module, so those need no rescaling of B
    common = next(s for a, _, s in sites.values() if a.shape[0] == rank)
    alpha = common * (math.sqrt(rank) if rslora else rank)
    positions = [p for p in lora_kind.TARGETS if any(pos == p for _, pos in sites)]
    layers = sorted({layer for layer, _ in sites})
    cfg = AdapterConfig("lora", bottleneck_size=rank, alpha=alpha, rslora=rslora, targets=positions,
                        dropout=dropout, dora=dora, leave_out=[i for i in range(model.num_layers) if i not in layers])
    tensors: dict[str, torch.Tensor] = {}
    dims = model._site_dims("lora", positions)
    for (layer, p), (a, b, _) in sites.items():  # every fit checked before the zero-padded tensors are made
        n_in, n_out = dims[layer][p]
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise InteropError(f"PEFT LoRA at layer {layer} {p}: A {tuple(a.shape)}, B {tuple(b.shape)} "
                               f"do not fit the projection ({n_in} -> {n_out})")
    for layer in layers:
        for p in positions:
            n_in, n_out = dims[layer][p]
            a_full = torch.zeros(rank, n_in)
            b_full = torch.zeros(n_out, rank)
            if (layer, p) in sites:
                a, b, scale = sites[(layer, p)]
                a_full[: a.shape[0]] = a.float()
                b_full[:, : a.shape[0]] = b.float() * (scale / common)
            tensors[f"layers.{layer}.{p}.A"] = a_full
            tensors[f"layers.{layer}.{p}.B"] = b_full
            if dora:  # the file's magnitude, else ||W|| as a new DoRA module starts (exactly the identity)
                m = magnitudes.get((layer, p))
                tensors[f"layers.{layer}.{p}.magnitude"] = (
                    lora_kind.direction_norm(_projection_weight(model, layer, p)).cpu() if m is None else m.float())
    return Converted(cfg, None, [], tensors)


def _projection_weight(model: AdapterModel, layer: int, position: str) -> torch.Tensor:
    """The (out, in) weight (a view) of the projection at (layer, position); its part of a fused one."""
    ls = model.layer_sites[layer]
    role = POSITIONS[position].output
    target = getattr(ls, role)
    w = target.weight if isinstance(target, nn.Linear) else target.weight.t()  # Conv1D keeps (in, out)
    part = ls.parts.get(role)
    return w if part is None else part.take(w, 0)


def _read_ia3(config: dict[str, Any], weights: dict[str, torch.Tensor], mmap: ModuleMap, model: AdapterModel) -> Converted:
    vectors = _take(weights, ".ia3_l")
    if not vectors:
        raise InteropError("PEFT IA3 folder without ia3_l tensors")
    sites: dict[tuple[int, str], torch.Tensor] = {}
    for module, vec in vectors.items():
        targets = mmap.targets(module)
        if vec.dim() == 2 and vec.shape[0] == 1:  # (1, in): scales the module's input
            down = [t for t in targets if t.position == "down"]
            if not down:
                raise InteropError(f"PEFT IA3 scales the input of {module!r}; adapterkit's IA3 scales only the input "
                                   "of the FFN's output projection (ff)")
            sites[(down[0].layer, "ff")] = vec[0]
            continue
        if vec.dim() != 2 or vec.shape[1] != 1:
            raise InteropError(f"PEFT IA3 vector of {module!r} has shape {tuple(vec.shape)}")
        outs = [t for t in targets if t.position in ("q", "k", "v")]
        if not outs:
            raise InteropError(f"PEFT IA3 scales the output of {module!r}; adapterkit's IA3 scales the outputs of "
                               "the key and value projections only")
        for t in outs:
            part = vec[:, 0] if t.part is None else t.part.take(vec[:, 0], 0)
            if t.position == "q":  # a fused q/k/v: the query third must be left alone
                if not torch.equal(part, torch.ones_like(part)):
                    raise InteropError(f"PEFT IA3 scales the query projection (in {module!r}); adapterkit's IA3 has no q target")
                continue
            sites[(t.layer, t.position)] = part
    positions = [p for p in ia3_kind.TARGETS if any(pos == p for _, pos in sites)]
    layers = sorted({layer for layer, _ in sites})
    cfg = AdapterConfig("ia3", targets=positions, leave_out=[i for i in range(model.num_layers) if i not in layers])
    dims = model._site_dims("ia3", positions)
    tensors = {}
    for layer in layers:
        for p in positions:
            n_in, n_out = dims[layer][p]
            size = n_in if p == "ff" else n_out
            vec = sites.get((layer, p), torch.ones(size))
            if vec.shape != (size,):
                raise InteropError(f"PEFT IA3 vector at layer {layer} {p} has {vec.shape[0]} entries; the projection has {size}")
            tensors[f"layers.{layer}.{p}.l"] = vec.float()
    return Converted(cfg, None, [], tensors)


def _pooler(base: nn.Module) -> nn.Module | None:
    """A BERT-style pooler (dense + tanh on the first token) of the base model, if it has one."""
    for owner in (base, getattr(base, getattr(base, "base_model_prefix", ""), None)):
        pooler = getattr(owner, "pooler", None) if owner is not None else None
        if pooler is not None and isinstance(getattr(pooler, "dense", None), nn.Linear) and isinstance(
            getattr(pooler, "activation", None), nn.Tanh
        ):
            return pooler
    return None


def _read_head(config: dict[str, Any], weights: dict[str, torch.Tensor], model: AdapterModel) -> tuple[str | None, dict, int]:
    """modules_to_save heads -> (adapterkit head type, ``head.*`` tensors, number of labels)."""
    saved = config.get("modules_to_save") or []
    present = [m for m in saved if any(k == m or k.startswith(m + ".") for k in weights)]
    if not present:
        return None, {}, 0
    task_type = config.get("task_type")
    cls_w, cls_b = weights.pop("classifier.weight", None), weights.pop("classifier.bias", None)
    if cls_w is None or cls_b is None:
        others = sorted(k for k in weights if any(k.startswith(m + ".") for m in saved))
        raise InteropError(f"PEFT modules_to_save {others[:3] or present}: only a 'classifier' head (with a bias) maps to "
                           "an adapterkit head")
    tensors = {}
    if task_type == "TOKEN_CLS":
        tensors = {"head.out.weight": cls_w, "head.out.bias": cls_b}
        return "token_classification", tensors, cls_w.shape[0]
    if task_type != "SEQ_CLS":
        raise InteropError(f"PEFT task_type {task_type!r} with a classifier: only SEQ_CLS and TOKEN_CLS heads map")
    pooler = _pooler(model.base)
    dense_w, dense_b = weights.pop("pooler.dense.weight", None), weights.pop("pooler.dense.bias", None)
    for k in [k for k in weights if k.startswith(f"{getattr(model.base, 'base_model_prefix', '')}.pooler.dense.")]:
        if k.endswith(".weight"):
            dense_w = weights.pop(k)
        else:
            dense_b = weights.pop(k)
    if dense_w is None:
        if pooler is None:
            raise InteropError("PEFT SEQ_CLS head: the classifier reads the base model's pooler (dense + tanh), which "
                               "this base model lacks; only BERT-style poolers map to adapterkit's classification head")
        dense_w, dense_b = pooler.dense.weight.detach().cpu(), pooler.dense.bias.detach().cpu()
    if model.sites.pooling != "first":
        raise InteropError("PEFT SEQ_CLS head on a model that does not pool the first token")
    tensors = {"head.dense.weight": dense_w, "head.dense.bias": dense_b, "head.out.weight": cls_w, "head.out.bias": cls_b}
    return "classification", tensors, cls_w.shape[0]


# -- writing -------------------------------------------------------------------------------------


def write_peft(model: AdapterModel, name: str, out: str | Path) -> Path:
    """Write adapter ``name`` (LoRA or IA3) as a PEFT folder that ``PeftModel.from_pretrained`` loads on
    the same base model (with a head: on ``AutoModelFor{Sequence,Token}Classification`` of it)."""
    adapter = model._get(name)
    cfg = adapter.config
    if cfg.kind not in ("lora", "ia3"):
        raise InteropError(f"adapter {name!r} is of kind {cfg.kind!r}; PEFT has LoRA and IA3 but no bottleneck adapters "
                           "(export it with --to adapters)")
    if cfg.dora and model.merged_adapter is not None:  # a fused projection's magnitude reads ||W||
        raise InteropError(f"adapter {name!r} is DoRA and adapter {model.merged_adapter!r} is merged into the base "
                           f"weights; unmerge_adapter({model.merged_adapter!r}) before exporting")
    _refuse_norms(adapter, name, "PEFT")
    mmap = ModuleMap(model)
    head_type = adapter.task.get("type")
    task_type, modules_to_save, prefix = None, None, ""
    weights: dict[str, torch.Tensor] = {}
    if adapter.head is not None:
        prefix = _head_prefix(model)
        state = {k: v.detach().cpu().float() for k, v in adapter.head.state_dict().items()}
        if head_type == "token_classification":
            task_type, modules_to_save = "TOKEN_CLS", ["classifier"]
        elif head_type == "classification" and _pooler(model.base) is not None:
            task_type, modules_to_save = "SEQ_CLS", ["classifier", "pooler"]
            weights[f"{prefix}pooler.dense.weight"] = state["dense.weight"]
            weights[f"{prefix}pooler.dense.bias"] = state["dense.bias"]
        else:
            raise InteropError(f"adapter {name!r} has a {head_type} head; PEFT's matching head (a BERT-style pooler and "
                               "classifier) needs a base model with such a pooler")
        weights["classifier.weight"], weights["classifier.bias"] = state["out.weight"], state["out.bias"]

    def local_name(module: str) -> str:
        return prefix + module if prefix and not module.startswith(prefix) else module

    grouped: dict[str, list] = {}
    for (layer, position), module in adapter._lookup().items():
        if not isinstance(position, str):
            continue  # norm affines, keyed (layer, index): refused above unless untouched
        target = mmap.module_of(layer, position)
        if target is None:
            raise InteropError(f"layer {layer} {position}: no module in this model")
        grouped.setdefault(local_name(target.module), []).append((target, module, position))
    rank_pattern, alpha_pattern = {}, {}
    r = cfg.bottleneck_size or 0
    alpha = float(cfg.alpha if cfg.alpha is not None else r) if cfg.kind == "lora" else None
    for module_name, parts in grouped.items():
        if cfg.kind == "lora":
            a, b, k = _join_lora(parts, model)
            weights[f"{module_name}.lora_A.weight"], weights[f"{module_name}.lora_B.weight"] = a, b
            if cfg.dora:
                weights[f"{module_name}.lora_magnitude_vector"] = _join_magnitude(parts, model)
            if k > 1:  # a fused projection: rank k r, and alpha such that the scale stays alpha / r
                rank_pattern[module_name] = k * r
                alpha_pattern[module_name] = alpha * (math.sqrt(k) if cfg.rslora else k)
        else:
            for key, vec in _join_ia3(parts, model).items():
                weights[f"{module_name}{key}"] = vec
    targets = sorted(grouped)
    if cfg.kind == "lora":
        config: dict[str, Any] = {
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": cfg.rslora,
            "lora_dropout": cfg.dropout, "target_modules": targets, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": _fan_in_fan_out(model, targets, prefix),
            "init_lora_weights": True, "use_dora": bool(cfg.dora),
        }
    else:
        ff = [m for m, parts in grouped.items() if any(position == "ff" for _, _, position in parts)]
        config = {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff,
                  "fan_in_fan_out": _fan_in_fan_out(model, targets, prefix), "init_ia3_weights": True}
    config.update({
        "task_type": task_type, "modules_to_save": modules_to_save, "inference_mode": True,
        "base_model_name_or_path": exported_base_id(model.base),  # a Hub id, or null: never a local path
        "revision": None, "peft_version": "0.21.2",  # the PEFT release this writer follows
    })
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({KEY_PREFIX + k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS_NAMES[0]),
              metadata={"format": "pt"})
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())
    return out


def _refuse_norms(adapter, name: str, fmt: str) -> None:
    for la in adapter.layers:
        if la is None:
            continue
        for norm in la.norms:
            if not (torch.all(norm.scale == 1) and torch.all(norm.shift == 0)):
                raise InteropError(f"adapter {name!r} trains layer-norm affines (train_layer_norms), which {fmt} cannot hold")


def _head_prefix(model: AdapterModel) -> str:
    """The backbone's attribute in ``AutoModelFor...Classification`` (``bert.``) when ours is bare."""
    prefix = getattr(model.base, "base_model_prefix", "")
    if not prefix or getattr(model.base, prefix, None) is not None:
        return ""  # the base already is a model with a head around its backbone
    return prefix + "."


def _fan_in_fan_out(model: AdapterModel, targets: list[str], prefix: str) -> bool:
    modules = dict(model.base.named_modules())
    kinds = {type(modules.get(t[len(prefix):] if prefix and t.startswith(prefix) else t)).__name__ for t in targets}
    return kinds == {"Conv1D"}


def _join_lora(parts: list, model: AdapterModel) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One PEFT module's (A, B, k) from adapterkit's positions on it: a plain projection has one; a
    fused one up to three, joined as A = [A_q; A_k; A_v] (k r, in), B (out, k r) with each position's
    B in its own rows and columns (block-diagonal up to the fused layout's row order)."""
    if len(parts) == 1 and parts[0][0].part is None:
        site = parts[0][1]
        return site.A.detach().cpu().float(), site.B.detach().cpu().float(), 1
    if any(target.part is None for target, _, _ in parts):
        raise InteropError(f"LoRA positions {[p for _, _, p in parts]} share module {parts[0][0].module!r} unfused")
    r = parts[0][1].A.shape[0]
    parts = sorted(parts, key=lambda p: p[0].part.start)
    a = torch.cat([site.A.detach().cpu().float() for _, site, _ in parts])
    b = torch.zeros(parts[0][0].part.width, r * len(parts))
    for j, (target, site, _) in enumerate(parts):
        target.part.put(b[:, j * r:(j + 1) * r], site.B.detach().cpu().float(), 0)
    return a, b, len(parts)


def _join_magnitude(parts: list, model: AdapterModel) -> torch.Tensor:
    """One PEFT module's DoRA magnitude (out,): a plain projection's own; a fused one's parts joined,
    ``||W||`` rows (PEFT's identity there, as B is zero) for a part no position adapts."""
    site = parts[0][1]
    if len(parts) == 1 and parts[0][0].part is None:
        return site.magnitude.detach().cpu().float()
    target, _, position = parts[0]
    projection = getattr(model.layer_sites[target.layer], POSITIONS[position].output)
    whole = projection.weight if isinstance(projection, nn.Linear) else projection.weight.t()  # (out, in)
    m = lora_kind.direction_norm(whole).cpu()
    for target, module, _ in parts:
        target.part.put(m, module.magnitude.detach().cpu().float(), 0)
    return m


def _join_ia3(parts: list, model: AdapterModel) -> dict[str, torch.Tensor]:
    """One PEFT module's ``ia3_l``: (1, in) for ff; (out, 1) for k / v (ones for a fused q part)."""
    target, site, position = parts[0]
    if len(parts) == 1 and position == "ff":
        return {".ia3_l": site.l.detach().cpu().float()[None, :]}
    if len(parts) == 1 and target.part is None:
        return {".ia3_l": site.l.detach().cpu().float()[:, None]}
    if any(p == "ff" or t.part is None for t, _, p in parts):
        raise InteropError(f"IA3 positions {[p for _, _, p in parts]} share module {target.module!r}")
    vec = torch.ones(target.part.width)
    for target, site, _ in parts:
        target.part.put(vec, site.l.detach().cpu().float(), 0)
    return {".ia3_l": vec[:, None]}
