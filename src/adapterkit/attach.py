"""Attaching to a base model: what adapterkit puts on it, and how it comes off again.

An ``Attachment`` owns every change made to the base model's module objects (never their code, their
module tree or their state-dict keys):

- forward hooks at each position of ``kinds.POSITIONS`` that an adapter uses, hooked lazily (a module
  without hooks keeps torch's fast call path): a *site hook* on a position's output module replaces
  its output, an *input-rewrite pre-hook* replaces its input (kinds that act on a projection's input),
  and a *capture pre-hook* on a feeding module keeps its input for kinds fed by it (parallel adapters);
  a position that acts on the backbone (prefix tuning) gets *backbone pre-hooks* that rewrite keyword
  inputs: one on a decoder's backbone (its KV cache, attention mask, position ids), or one on each
  layer's self-attention module (encoders, encoder-decoders: its cache argument and mask);
- ``RoutedNorm``: an instance-level ``forward`` on each layer norm that applies a task's affine per row;
- ``RoutedCheckpoint``: gradient-checkpoint functions that recompute under the forward's route.

Every hook asks its owner (an ``AdapterModel``, held weakly) for the current route and returns at once
when there is none, so a base model with no adapter routed computes exactly what it did before.
``detach`` removes everything; ``rebind_copy`` gives a deep copy hooks of its own.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .kinds import KINDS, POSITIONS
from .routing import current_route, routed
from .sites import LayerSites, Part, apply_at_site, backbone

if TYPE_CHECKING:
    from .model import AdapterModel

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


class RoutedNorm:
    """Replaces one norm module's ``forward`` (an instance attribute: the module tree, its state-dict
    keys and its class are untouched) so a task's affine applies per row."""

    def __init__(self, owner: AdapterModel, module: nn.Module, layer: int, index: int):
        self.owner = weakref.ref(owner)
        self.module = module
        self.layer, self.index = layer, index
        # An instance-level forward (accelerate's offload hooks set one) is kept and called through.
        self.own_forward = module.__dict__.get("forward")
        self.original = self.own_forward or type(module).forward.__get__(module)
        self.is_layer_norm = type(module) is nn.LayerNorm  # subclasses may change the maths: no folding

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        owner = self.owner()
        route = owner._route() if owner is not None else None
        if route is None:
            return self.original(x, *args, **kwargs)
        m = self.module
        if route.single is not None:
            affine = route.single.norm(self.layer, self.index) if self.layer >= route.drop_below else None
            if affine is None:
                return self.original(x, *args, **kwargs)
            scale, shift = affine.scale.to(x.dtype), affine.shift.to(x.dtype)
            if self.is_layer_norm:  # fold into the norm's own affine: one fused kernel, as without adapters
                w = scale if m.weight is None else m.weight * scale
                b = shift if m.bias is None else m.bias * scale + shift
                return F.layer_norm(x, m.normalized_shape, w, b, m.eps)
            return torch.addcmul(shift, self.original(x, *args, **kwargs), scale)
        # The norm once for the whole batch, then one per-row affine. (Not folded into F.layer_norm's
        # own affine: that takes no per-row weights, and without weights it runs a slower kernel.)
        per_row = route.norm_affine(self.layer, self.index, x.dtype, x.device)
        if per_row is None:
            return self.original(x, *args, **kwargs)
        scale, shift = per_row  # (B, 1, d)
        shape = x.shape
        # (B, T', d): each row's tokens are one contiguous block, whether the batch leads (B·beams, T, d)
        # or tokens are flattened (B·T, d) (site_check verifies one of the two)
        y = self.original(x, *args, **kwargs).reshape(scale.shape[0], -1, shape[-1])
        if self.is_layer_norm and not torch.is_grad_enabled():  # y is a fresh buffer: reuse it
            return torch.addcmul(shift, y, scale, out=y).reshape(shape)
        return torch.addcmul(shift, y, scale).reshape(shape)


class RoutedCheckpoint:
    """A checkpoint function that recomputes under the route that was current at forward time (the
    recomputation runs during backward, outside the call's routing context)."""

    def __init__(self, checkpoint: Any, owner: AdapterModel):
        self.checkpoint, self.owner = checkpoint, weakref.ref(owner)

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner()
        route = current_route(owner) if owner is not None else None
        if route is None:
            return self.checkpoint(function, *args, **kwargs)

        def run(*a: Any, **k: Any) -> Any:
            with routed(owner, route):
                return function(*a, **k)

        return self.checkpoint(run, *args, **kwargs)


def _site_hook(owner: weakref.ref, layer: int, position: str, part: Part | None, flat: bool):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor):
        model = owner()
        route = model._route() if model is not None else None
        if route is None:
            return None
        if part is None:  # (tuple outputs and flattened tokens: see apply_at_site)
            return apply_at_site(route, layer, position, out, flat)
        # a fused projection (GPT-2's c_attn): this position owns its rows of the output, (..., size):
        # a view of one block, or a copy of rows interleaved per head
        view = part.take(out)
        new = route.apply_site(layer, position, view)
        if new is None or new.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            return None  # nothing to do, or done in place in this part
        if torch.is_grad_enabled():
            out = out.clone()  # the hooked output may be saved for backward
        part.put(out, new)
        return out

    return hook


def _rewrite_hook(owner: weakref.ref, layer: int, position: str, flat: bool):
    def hook(module: nn.Module, args: tuple):
        model = owner()
        route = model._route() if model is not None else None
        new = None if route is None else apply_at_site(route, layer, position, args[0], flat)
        return None if new is None else (new, *args[1:])

    return hook


def _backbone_hook(owner: weakref.ref, position: str, layers: list[int], cls: type, apply: Any):
    """A pre-hook (with kwargs) on a module a backbone position acts through (the decoder backbone, or
    one layer's self-attention): ``apply(route, position, members, module, inputs, layers)`` rewrites
    its inputs, by name, for the modules of class ``cls`` at ``layers``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        model = owner()
        route = model._route() if model is not None else None
        if route is None:
            return None
        members = [route.members((i, position)) for i in layers]  # [layer][adapter k]
        if not any(type(m) is cls for per in members for m in per):
            return None
        own = [[m if type(m) is cls else None for m in per] for per in members]
        new = apply(route, position, own, module, _by_name(module, args, kwargs), layers)
        return None if new is None else ((), new)

    return hook


_POSITIONAL: dict[type, list[str]] = {}  # module class -> its forward's positional parameter names


def _by_name(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's positional and keyword arguments as one dict by parameter name."""
    if not args:
        return dict(kwargs)
    own = "forward" in module.__dict__  # an instance-level forward (accelerate's hooks) may differ
    names = None if own else _POSITIONAL.get(type(module))
    if names is None:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not own:
            _POSITIONAL[type(module)] = names
    return {**dict(zip(names, args)), **kwargs}


def _capture_hook(owner: weakref.ref, layer: int, position: str):
    def hook(module: nn.Module, args: tuple):
        model = owner()
        route = model._route() if model is not None else None
        if route is not None and route.needs_input(layer, position):
            route.keep_input(layer, position, args[0])

    return hook


class Attachment:
    """The hooks and wrappers one ``AdapterModel`` put on its base model's layers.

    Args:
        owner: the model whose ``_route()`` every hook consults (held weakly: hooks must not keep it
            alive).
        layer_sites: the resolved sites, one ``LayerSites`` per layer (``sites.find_layers``).
    """

    def __init__(self, owner: AdapterModel, layer_sites: Sequence[LayerSites]):
        self.owner = weakref.ref(owner)
        self.layer_sites = list(layer_sites)
        self.handles: list[Any] = []
        self.hooked: list[str] = []  # positions hooked so far, in hooking order
        self.norm_wrappers: list[RoutedNorm] = []

    def attach(self, positions: Sequence[str] = ("attn", "ffn")) -> None:
        """Hook ``positions`` (by default the bottleneck kinds'; others come on demand) and wrap every
        found norm."""
        self.hook(positions)
        owner = self.owner()
        for ls in self.layer_sites:
            for j, (_, norm) in enumerate(ls.norms):
                wrapper = RoutedNorm(owner, norm, ls.index, j)
                norm.forward = wrapper  # instance attribute shadows the class's forward
                self.norm_wrappers.append(wrapper)

    def hook(self, positions: Sequence[str]) -> None:
        """Hook each of ``positions`` not hooked yet, on every layer that has its modules."""
        for position in [p for p in positions if p not in self.hooked]:
            where = POSITIONS[position]
            if where.acts_on == "backbone":
                self._hook_backbone(position)
                self.hooked.append(position)
                continue
            for ls in self.layer_sites:
                target = getattr(ls, where.output)
                if target is None:  # an optional role this layer lacks (a gate in a plain FFN)
                    continue
                flat = where.output in ls.flat
                if where.acts_on == "input":
                    hook = _rewrite_hook(self.owner, ls.index, position, flat)
                    # before any capture pre-hook on the module: a kind fed by the same input
                    # (LoRA on that projection) reads the rewritten input, as the merged weights would
                    self.handles.append(target.register_forward_pre_hook(hook, prepend=True))
                else:
                    hook = _site_hook(self.owner, ls.index, position, ls.parts.get(where.output), flat)
                    # A projection's own change (LoRA, IA3: fed by its input) runs before any
                    # bottleneck on the same module's output, whatever the hooking order: composed
                    # rows (Stack) see one fixed order of the two
                    first = where.input == where.output
                    self.handles.append(target.register_forward_hook(hook, prepend=first))
                feeder = None if where.input is None else getattr(ls, where.input)
                if feeder is not None:
                    self.handles.append(feeder.register_forward_pre_hook(_capture_hook(self.owner, ls.index, position)))
            self.hooked.append(position)

    def _hook_backbone(self, position: str) -> None:
        """The pre-hooks of ``position``, after the kinds acting there vetted the base: where each kind's
        module class names them (``backbone_hooks``: one per layer's self-attention, for prefixes on
        encoders), else one on the backbone (``apply_backbone``)."""
        base = self.owner().base
        classes = list(dict.fromkeys(kind.module for kind in KINDS.values() if position in kind.sites))
        for cls in classes:
            check = getattr(cls, "check_base", None)
            if check is not None:
                check(base)  # ValueError before anything is hooked
        layers = [ls.index for ls in self.layer_sites]
        for cls in classes:
            place = getattr(cls, "backbone_hooks", None)
            targets = place(base, self.layer_sites) if place is not None else None
            if targets is None:
                targets = [(backbone(base), layers, cls.apply_backbone)]
            for module, served, apply in targets:
                hook = _backbone_hook(self.owner, position, served, cls, apply)
                self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def wrap_checkpointing(self, base: nn.Module) -> None:
        """Carry each call's route into gradient checkpointing's recomputation."""
        for module in base.modules():
            fn = module.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and not isinstance(fn, RoutedCheckpoint):
                module._gradient_checkpointing_func = RoutedCheckpoint(fn, self.owner())

    def detach(self) -> None:
        """Remove every hook and norm wrapper; the base model's modules are as before attaching."""
        for h in self.handles:
            h.remove()
        for w in self.norm_wrappers:
            if w.module.__dict__.get("forward") is w:
                if w.own_forward is None:
                    del w.module.forward
                else:
                    w.module.forward = w.own_forward
        self.handles, self.norm_wrappers, self.hooked = [], [], []

    def rebind_copy(self, clone: AdapterModel, clone_base: nn.Module, clone_layer_sites: Sequence[LayerSites]) -> None:
        """Turn this (deep-copied) attachment into the clone's own: the copied base carries copies of
        the original's hooks, which would route by the original, so they are dropped and hooked anew;
        the copied norm and checkpoint wrappers are pointed at the clone. Called on the copy."""
        ours = {h.id for h in self.handles}
        for module in clone_base.modules():
            for name in _HOOK_DICTS:
                hooks = module.__dict__.get(name)
                for hook_id in ours if hooks is not None else ():
                    hooks.pop(hook_id, None)
            fn = module.__dict__.get("_gradient_checkpointing_func")
            if isinstance(fn, RoutedCheckpoint):
                fn.owner = weakref.ref(clone)
        self.owner = weakref.ref(clone)
        self.layer_sites = list(clone_layer_sites)
        for wrapper in self.norm_wrappers:
            wrapper.owner = weakref.ref(clone)
        hooked, self.handles, self.hooked = self.hooked, [], []
        if ours:
            self.hook(hooked)
