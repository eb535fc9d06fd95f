"""Attach-time verification of a model's sites: one dry forward pass before any adapter trusts them.

A site-table row (or a guess, or a user's SiteSpec) names modules; that the names exist says nothing
about what flows through them. Per-row adapters are only right when every hooked tensor leads with the
batch: a time-major layer (FSMT sees ``(T, B, d)``) or tokens flattened to ``(B·T, d)`` (OPT's FFN)
would hand row i's adapter another row's tokens, silently. So ``verify_sites`` runs the base model
once, with probe hooks on every site, on a batch of 2 rows of 5 tokens (3 decoder tokens; batch,
lengths and their products all differ, so no layout can pass for another) and refuses, naming the
site, unless:

- every hooked module runs exactly once per forward (a shared layer, declared ``SiteSpec.shared``,
  runs the same number of times at each of its sites);
- each site's tensor (the output of ``attn_out``, ``ffn_out`` and each norm; the input of ``ffn_in``)
  is a tensor whose last dimension is the hidden size and whose leading dimension is the batch, or,
  for modules declared in ``SiteSpec.flat``, the batch times the tokens;
- every norm the row found runs (an affine trained on a norm that never runs would be lost).

Cost: one forward pass of 10 tokens (2 images for vision models), done once per base model and
SiteSpec (repeated ``AdapterModel(base)`` calls on one base skip it), negligible next to loading the
model. ``AdapterModel(base, verify=False)`` skips it, for models whose forward needs inputs adapterkit
cannot make up (audio features, layout boxes) or whose weights are not materialised (meta device).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .sites import LayerSites, SiteSpec, UnknownArchitecture

DRY_BATCH, DRY_LENGTH, DRY_DECODER_LENGTH = 2, 5, 3

# base model -> the SiteSpecs already verified on it (a model verified once is not run again).
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, set[SiteSpec]] = weakref.WeakKeyDictionary()


class SiteCheckError(UnknownArchitecture):
    """A model's sites do not behave as per-row adapters need (the message names the site)."""


def dry_inputs(model: nn.Module, batch: int = DRY_BATCH, length: int = DRY_LENGTH) -> dict[str, torch.Tensor]:
    """A small batch the base model accepts: token ids (plus decoder ids for encoder-decoders) or
    images, on the model's device. Raises SiteCheckError for inputs it cannot make up."""
    config = model.config
    param = next((p for p in model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        vocab = int(getattr(config, "vocab_size", 0) or 0) or 100
        # fixed, varied ids away from the usual special tokens (0-2)
        ids = (torch.arange(batch * length, device=device).reshape(batch, length) * 7 + 3) % max(vocab - 3, 1) + 3
        ids = ids.clamp(max=vocab - 1)
        inputs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, :DRY_DECODER_LENGTH]
        if getattr(config, "is_encoder_decoder", False) or getattr(model, "can_generate", lambda: False)():
            inputs["use_cache"] = False  # a dry pass needs no cache (and 4.57's FSMT cannot build one)
        return inputs
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = getattr(vision, "num_channels", 3)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        g = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(batch, channels, height, width, generator=g).to(device, dtype)}
    raise SiteCheckError(
        f"{type(model).__name__}: adapterkit cannot make up a dry-pass input {name!r} to verify its sites; "
        f"pass verify=False to attach without the check (at your own risk)"
    )


class _Probe:
    """Counts one module's calls and keeps the shape it saw (output, or first input for ``ffn_in``)."""

    def __init__(self, where: str):
        self.where = where
        self.calls = 0
        self.seen: Any = None

    def output(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.calls += 1
        self.seen = out[0] if isinstance(out, tuple) and out else out

    def input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        self.seen = args[0] if args else ("keyword", sorted(kwargs))


def verify_sites(
    base: nn.Module,
    spec: SiteSpec,
    layers: Sequence[LayerSites],
    hidden_size: int,
    *,
    inputs: dict[str, torch.Tensor] | None = None,
) -> None:
    """Run ``base`` once on a dry batch and refuse sites that per-row adapters would get wrong.

    Raises SiteCheckError naming the first bad site; warns when a layer has no norms although the row
    names some. Verified (base, spec) pairs are remembered and not run again.
    """
    if spec in _VERIFIED.get(base, ()):
        return
    if any(p.is_meta for p in base.parameters()):
        raise SiteCheckError(
            f"{type(base).__name__} has weights on the meta device: the dry pass that verifies its sites cannot "
            f"run; load the weights first, or pass verify=False"
        )
    inputs = inputs if inputs is not None else dry_inputs(base)
    batch = next(iter(inputs.values())).shape[0]

    probes: dict[int, tuple[_Probe, str]] = {}  # id(module) -> (probe, role); shared layers share probes
    handles = []

    def probe(module: nn.Module, where: str, role: str) -> None:
        if id(module) in probes:
            return
        p = _Probe(where)
        probes[id(module)] = (p, role)
        if role == "ffn_in":
            handles.append(module.register_forward_pre_hook(p.input, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(p.output))

    for ls in layers:
        for role in ("attn_out", "ffn_in", "ffn_out"):
            probe(getattr(ls, role), f"{ls.path}.{ls.names.get(role, role)}", role)
        for name, norm in ls.norms:
            probe(norm, f"{ls.path}.{name}", "norm")
    flags = [(m, m.training) for m in base.modules()]
    base.eval()  # no dropout, no batch-statistics updates
    try:
        with torch.no_grad():
            base(**inputs)
    except Exception as e:  # the base model's own failure: say which step failed
        raise SiteCheckError(
            f"the dry pass that verifies {type(base).__name__}'s sites failed: {type(e).__name__}: {e}. "
            f"Pass verify=False to attach without the check"
        ) from e
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training

    flat_ok = {id(getattr(ls, r)) for ls in layers for r in ("attn_out", "ffn_in", "ffn_out") if r in ls.flat}
    flat_ok |= {id(n) for ls in layers for name, n in ls.norms if name in ls.flat}
    what = {"attn_out": "output", "ffn_out": "output", "norm": "output", "ffn_in": "input"}
    for ls in layers:
        sites = [(getattr(ls, r), r) for r in ("attn_out", "ffn_in", "ffn_out")] + [(n, "norm") for _, n in ls.norms]
        counts = {probes[id(m)][0].calls for m, _ in sites}
        for module, role in sites:
            p, _ = probes[id(module)]
            if p.calls == 0:
                raise SiteCheckError(f"{p.where} never runs in a forward pass of {type(base).__name__}: "
                                     f"an adapter there would do nothing")
            if spec.shared:
                if len(counts) > 1:
                    raise SiteCheckError(f"{p.where} runs {p.calls} times per forward pass, other sites of its "
                                         f"shared layer {sorted(counts)} times")
            elif p.calls > 1:
                raise SiteCheckError(
                    f"{p.where} runs {p.calls} times per forward pass, not once: a layer shared between depths? "
                    f"Declare SiteSpec(shared=True) for one adapter applied at every depth"
                )
            _check_shape(p, what[role], batch, hidden_size, flat=id(module) in flat_ok)
    empty = [ls.path for ls in layers if not ls.norms]
    if spec.norms and empty:
        warnings.warn(
            f"{type(base).__name__}: layers {', '.join(empty[:4])}{'...' if len(empty) > 4 else ''} have none of the "
            f"norms {spec.norms}: kinds that train layer norms (houlsby) will train none there", stacklevel=3)
    _VERIFIED.setdefault(base, set()).add(spec)


def _check_shape(p: _Probe, what: str, batch: int, hidden: int, flat: bool) -> None:
    seen = p.seen
    if isinstance(seen, tuple) and seen and seen[0] == "keyword":
        raise SiteCheckError(f"{p.where} receives its input as keywords {seen[1]}, not positionally: the FFN "
                             f"input cannot be captured there; name another ffn_in module")
    if not isinstance(seen, torch.Tensor):
        raise SiteCheckError(f"{p.where}'s {what} is a {type(seen).__name__}, not a tensor")
    shape = tuple(seen.shape)
    if seen.dim() < 2 or shape[-1] != hidden:
        raise SiteCheckError(f"{p.where}'s {what} has shape {shape}; adapters need (batch, ..., {hidden}) "
                             f"(the hidden size last)")
    if shape[0] == batch:
        return
    if flat and seen.dim() == 2 and shape[0] % batch == 0:
        return
    if seen.dim() == 3 and shape[1] == batch and shape[0] != batch:
        layout = f"time-major (T, B, d) = {shape}"
    elif seen.dim() == 2 and shape[0] % batch == 0:
        layout = (f"tokens flattened to (B·T, d) = {shape}; if each row's tokens are one contiguous block, "
                  f"declare the module in SiteSpec.flat")
    else:
        layout = f"shape {shape}"
    raise SiteCheckError(
        f"{p.where}'s {what} does not lead with the batch (a dry batch of {batch} rows gave {layout}): "
        f"per-row adapters there would mix rows, so adapterkit refuses it"
    )


def warn_if_no_norms(layers: Sequence[LayerSites], trains_norms: bool, kind: str) -> None:
    """Warn when an adapter whose kind trains layer-norm affines finds no norm to train."""
    if not trains_norms:
        return
    empty = [ls.path for ls in layers if not ls.norms]
    if empty:
        where = "any layer" if len(empty) == len(layers) else f"layers {', '.join(empty[:4])}{'...' if len(empty) > 4 else ''}"
        warnings.warn(
            f"a {kind} adapter trains layer-norm affines, but no norm was found in {where}: it trains none there "
            f"(see model.sites_report(); pass a SiteSpec naming the norms)", stacklevel=3)
