"""Bottleneck maths, one task's adapter, and per-row routing of a batch over many adapters.

Shapes: B rows, T tokens, d hidden size, r bottleneck width, K distinct adapters in a batch.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig

ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Bottleneck(nn.Module):
    """down (d -> r) -> activation -> up (r -> d) -> dropout -> * scaling: the delta an adapter adds.

    Serial adapters add ``delta(out)`` to the sublayer's output ``out`` (that sum is the adapter's skip
    connection); parallel ones add ``delta(inp)``, fed by the sublayer's input. Both projections start
    from a truncated N(0, init_std) and zero biases, so a new adapter is close to the identity.
    """

    def __init__(self, hidden_size: int, config: AdapterConfig, **factory: Any):
        super().__init__()
        r = config.bottleneck_for(hidden_size)
        self.down = nn.Linear(hidden_size, r, **factory)
        self.up = nn.Linear(r, hidden_size, **factory)
        self.activation = config.activation
        self.scaling = config.scaling
        self.parallel = config.parallel
        self.dropout = config.dropout
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=config.init_std, a=-2 * config.init_std, b=2 * config.init_std)
            nn.init.zeros_(linear.bias)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """(down.weight, down.bias, up.weight, up.bias), read live (``load_state_dict(assign=True)``
        replaces Parameter objects) through plain dicts: the per-call paths read these thousands of times."""
        down, up = self._modules["down"]._parameters, self._modules["up"]._parameters
        return down["weight"], down["bias"], up["weight"], up["bias"]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Bottleneck:
        _bump_epoch(self)  # .to() / .half() / .cuda(): the new storage may reuse an old address
        return super()._apply(fn, *args, **kwargs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        """The delta alone (training with dropout, or to inspect an adapter)."""
        h = self.hidden(z)
        delta = F.linear(h, self.up.weight.to(h.dtype), self.up.bias.to(h.dtype))
        if self.scaling != 1.0:
            delta = delta * self.scaling
        return F.dropout(delta, self.dropout, self.training) if self.dropout else delta

    def hidden(self, z: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., r)
        dt = z.dtype  # weights may be kept in float32 under a bf16/fp16 base
        h = F.linear(z, self.down.weight.to(dt), self.down.bias.to(dt))
        return ACTIVATION_FNS[self.activation](h)

    def add_to(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``out + delta(z)``, with the up-projection, the scaling and the residual add fused into one
        matmul-accumulate (in place when autograd is off): (..., d) -> (..., d)."""
        if self.dropout and self.training:
            return out + self(z)
        h = self.hidden(z)
        up = self.packed(out.dtype)[2]  # (r + 1, d): scaled weight rows, then the scaled bias row
        h = h.reshape(-1, h.shape[-1])
        if not out.is_contiguous():
            out = out.contiguous()
        flat = out.view(-1, out.shape[-1])
        if torch.is_grad_enabled():  # ``out`` may be saved for backward (as z): a new tensor
            return torch.addmm(flat, h, up[:-1]).add_(up[-1]).view(out.shape)
        return flat.addmm_(h, up[:-1]).add_(up[-1]).view(out.shape)  # the projection's fresh output

    def packed(self, dtype: torch.dtype, width: int | None = None, keep: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights as mixed batches and the fused path use them, r zero-padded to ``width``
        (padded units get zero weights in and out: exact):

        down.weight.T (d, width), down.bias (1, width), and [up.weight.T; up.bias] * scaling (width + 1, d).
        With ``keep``, cached while autograd is off (inference); rebuilt when any weight changes.
        """
        params = self.params
        width = width or params[0].shape[0]
        key = (dtype, width, params[0].device, *weights_key(self))
        grad = torch.is_grad_enabled()
        cached = self.__dict__.get("_packed")
        if not grad and cached is not None and cached[0] == key and cached[1][0].is_inference() == torch.is_inference_mode_enabled():
            return cached[1]
        pad = width - self.down.out_features
        down_w = F.pad(self.down.weight.t().to(dtype), (0, pad))
        down_b = F.pad(self.down.bias.to(dtype)[None], (0, pad))
        up = torch.cat([F.pad(self.up.weight.t().to(dtype), (0, 0, 0, pad)), self.up.bias.to(dtype)[None]])
        if self.scaling != 1.0:
            up = up * self.scaling
        packs = (down_w, down_b, up)
        if keep and not grad:
            self.__dict__["_packed"] = (key, packs)
        return packs


class NormAffine(nn.Module):
    """A task's own affine on a layer norm's output: y -> y * scale + shift (starts at 1, 0).

    For y = n(x) * w + b this is the norm with affine (w * scale, b * scale + shift): training it is
    training the norm's affine, for any norm class (LayerNorm, RMSNorm, T5's), without knowing its
    formula. nn.LayerNorm folds it into its own weights, so it costs nothing there.
    """

    def __init__(self, hidden_size: int, **factory: Any):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_size, **factory))
        self.shift = nn.Parameter(torch.zeros(hidden_size, **factory))

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return self._parameters["scale"], self._parameters["shift"]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> NormAffine:
        _bump_epoch(self)
        return super()._apply(fn, *args, **kwargs)


class LayerAdapter(nn.Module):
    """One task's modules in one transformer layer."""

    def __init__(self, hidden_size: int, config: AdapterConfig, num_norms: int, **factory: Any):
        super().__init__()
        self.attn = Bottleneck(hidden_size, config, **factory) if "attn" in config.sites else None
        self.ffn = Bottleneck(hidden_size, config, **factory) if "ffn" in config.sites else None
        n = num_norms if config.train_layer_norms else 0
        self.norms = nn.ModuleList(NormAffine(hidden_size, **factory) for _ in range(n))


class TaskAdapter(nn.Module):
    """Everything one task adds to the base model: per-layer bottlenecks and norm affines, and a head."""

    def __init__(
        self,
        config: AdapterConfig,
        hidden_size: int,
        norms_per_layer: list[int],
        head: nn.Module | None = None,
        task: dict[str, Any] | None = None,
        head_spec: dict[str, Any] | None = None,
        **factory: Any,
    ):
        super().__init__()
        self.config = config
        self.task = task or {"type": "none", "labels": []}
        self.head_spec = head_spec
        self.layers = nn.ModuleList(
            None if i in config.leave_out else LayerAdapter(hidden_size, config, n, **factory)
            for i, n in enumerate(norms_per_layer)
        )
        self.head = head

    def _lookup(self) -> dict[tuple, Any]:
        """(layer, "attn"|"ffn") -> Bottleneck and (layer, norm index) -> NormAffine, as a plain dict:
        routing reads these per site per call, and nn.Module attribute lookups are slow."""
        table = self.__dict__.get("_table")
        if table is None:
            table = {}
            for i, la in enumerate(self.layers):
                if la is None:
                    continue
                for position in ("attn", "ffn"):
                    if getattr(la, position) is not None:
                        table[(i, position)] = getattr(la, position)
                for j, n in enumerate(la.norms):
                    table[(i, j)] = n
            self.__dict__["_table"] = table
        return table

    def bottleneck(self, layer: int, position: str) -> Bottleneck | None:
        return self._lookup().get((layer, position))

    def norm(self, layer: int, index: int) -> NormAffine | None:
        return self._lookup().get((layer, index))


def _bump_epoch(module: nn.Module) -> None:
    module.__dict__["_epoch"] = module.__dict__.get("_epoch", 0) + 1


def weights_key(module: Bottleneck | NormAffine) -> list[int]:
    """Changes whenever the module's weights do: in-place updates bump ``_version``; ``p.data = ...``
    swaps the storage (new address) without bumping it; ``.to()`` / ``.half()`` bump the epoch.
    (Writes through ``p.data`` in place are invisible to this, as they are to autograd.)"""
    params = module.params
    return [module.__dict__.get("_epoch", 0)] + [p._version for p in params] + [p.data_ptr() for p in params]


class _Stack:
    """One site's weights of many adapters, stacked along dim 0 (slot 0: zeros, for rows without an
    adapter), so that a mixed batch gathers its rows' weights with one ``index_select``."""

    def __init__(self, zeros: tuple[torch.Tensor, ...]):
        self.tensors = [z[None].clone() for z in zeros]  # each (capacity, ...)
        self.entries: dict[int, tuple[weakref.ref, list[int], int]] = {}  # id(member) -> (member, key, slot)
        self.used = 1
        self.free: list[int] = []

    def slots(self, members: Sequence[Any], pack: Callable[[Any], tuple[torch.Tensor, ...]]) -> list[int]:
        """Each member's slot (None: slot 0), copying in the members that are new or changed."""
        out = [0]
        get = self.entries.get
        for m in members:
            if m is None:
                out.append(0)
                continue
            key = weights_key(m)
            entry = get(id(m))
            if entry is not None and entry[1] == key and entry[0]() is m:
                out.append(entry[2])
                continue
            # new, or changed weights, or a dead module's id reused: (re)fill a slot in place
            slot = self._new_slot() if entry is None else entry[2]
            for stacked, value in zip(self.tensors, pack(m)):
                stacked[slot].copy_(value)
            self.entries[id(m)] = (weakref.ref(m), key, slot)
            out.append(slot)
        return out

    def forget(self, member: nn.Module) -> None:
        entry = self.entries.get(id(member))
        if entry is not None and entry[0]() is member:
            del self.entries[id(member)]
            self.free.append(entry[2])

    def _new_slot(self) -> int:
        if not self.free and self.used == self.tensors[0].shape[0]:
            # full: reclaim the slots of garbage-collected adapters, else double the capacity
            for k in [k for k, e in self.entries.items() if e[0]() is None]:
                self.free.append(self.entries.pop(k)[2])
            if not self.free:
                self.tensors = [torch.cat([t, torch.empty_like(t)]) for t in self.tensors]
        if self.free:
            return self.free.pop()
        self.used += 1
        return self.used - 1


class StackStore:
    """Per-site stacks of adapter weights for mixed batches, kept by a model across inference calls.

    A mixed batch needs each row's weights side by side. Stacking them afresh would copy every adapter
    in the batch at every site on every call; here each adapter is copied in once (again only when its
    weights change) and a call gathers its rows with one ``index_select`` per tensor. Inference only:
    under autograd every forward builds its stacks in its own graph.
    """

    def __init__(self) -> None:
        self._stacks: dict[tuple, _Stack] = {}
        self._lock = threading.Lock()  # serving threads may share one model

    def __deepcopy__(self, memo: dict) -> StackStore:
        return StackStore()  # a copy of the model refills its own

    def gather(
        self,
        key: tuple,
        members: Sequence[Any],
        row_slots: Sequence[int],
        zeros: Callable[[], tuple[torch.Tensor, ...]],
        pack: Callable[[Any], tuple[torch.Tensor, ...]],
    ) -> list[torch.Tensor]:
        """Row-aligned weights (B, ...): row i gets ``pack(members[row_slots[i] - 1])``, or ``zeros()``
        where that slot is 0 or its member None. ``key`` names the site, dtype, device and width."""
        key = (*key, torch.is_inference_mode_enabled())  # inference tensors cannot be updated outside
        with self._lock:
            stack = self._stacks.get(key)
            if stack is None:
                stack = self._stacks[key] = _Stack(zeros())
            slots = stack.slots(members, pack)
            index = torch.tensor([slots[s] for s in row_slots], device=stack.tensors[0].device)
            return [t.index_select(0, index) for t in stack.tensors]

    def forget(self, members: Sequence[nn.Module]) -> None:
        """Drop these modules' copies (their adapter was deleted)."""
        with self._lock:
            for key, stack in list(self._stacks.items()):
                for m in members:
                    stack.forget(m)
                if not stack.entries:  # e.g. the last adapter of that width: free the whole stack
                    del self._stacks[key]


# ---------------------------------------------------------------------------------------------
# Routing: which adapter each row of the current forward pass uses
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Route:
    """The adapters of one forward call (or one ``generate`` call), row by row.

    ``single`` is set when every row uses the same adapter: then sites run that adapter's own
    parameters on the whole batch (no gather, no copies). Otherwise ``rows`` holds each row's adapter
    (None: no adapter) and sites gather per-row weights from ``store``.
    """

    rows: list[TaskAdapter | None]
    single: TaskAdapter | None = None
    repeats_rows: bool = False  # generate() may repeat each row (beams, num_return_sequences)
    # FFN inputs for parallel adapters, per (thread, layer): the default route is shared by threads
    captured: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)
    store: StackStore | None = None  # the model's weight stacks; a route without one keeps its own

    @classmethod
    def for_rows(cls, rows: list[TaskAdapter | None], store: StackStore | None = None) -> Route | None:
        unique = {id(a): a for a in rows}
        if len(unique) == 1:
            only = rows[0]
            return None if only is None else cls(rows, single=only)
        return cls(rows, store=store)

    def __post_init__(self) -> None:
        # Distinct adapters in this route, in first-seen order.
        self.adapters: list[TaskAdapter] = list({id(a): a for a in self.rows if a is not None}.values())
        slot = {id(a): k + 1 for k, a in enumerate(self.adapters)}
        self.slots = [0 if a is None else slot[id(a)] for a in self.rows]  # row -> 1 + index in adapters
        if self.single is None and self.store is None:
            self.store = StackStore()

    def slot_index(self, device: torch.device) -> torch.Tensor:
        """(B,) row -> slot, where slot 0 means "no adapter here"."""
        key = ("slots", device)
        if key not in self.cache:
            self.cache[key] = torch.tensor(self.slots, device=device)
        return self.cache[key]

    def members(self, key: tuple) -> list[Any]:
        """Each distinct adapter's module at one site, (layer, "attn"|"ffn") or (layer, norm index)."""
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = [a._lookup().get(key) for a in self.adapters]
        return hit

    def needs_ffn_input(self, layer: int) -> bool:
        key = ("parallel", layer)
        if key not in self.cache:
            self.cache[key] = any(b is not None and b.parallel for b in self.members((layer, "ffn")))
        return self.cache[key]

    def keep_ffn_input(self, layer: int, inp: torch.Tensor) -> None:
        self.captured[(threading.get_ident(), layer)] = inp

    def take_ffn_input(self, layer: int) -> torch.Tensor | None:
        return self.captured.pop((threading.get_ident(), layer), None)

    def check_rows(self, n: int) -> int:
        """How many times each route row repeats in a batch of n rows (1 outside generate)."""
        rows = len(self.rows)
        if n == rows:
            return 1
        if not self.repeats_rows or n % rows:
            raise ValueError(f"adapter_names has {rows} entries but the batch has {n} rows")
        return n // rows

    def expand(self, per_row: torch.Tensor, n: int) -> torch.Tensor:
        """Per-row tensor (B, ...) for a batch of n rows: generate() repeats each row for beams."""
        rep = self.check_rows(n)
        return per_row if rep == 1 else per_row.repeat_interleave(rep, dim=0)

    def _gather(self, key: tuple, members: list[Any], dtype: torch.dtype, device: torch.device, zeros, pack) -> list[torch.Tensor]:
        """Per-row weights (B, ...) of one site. Inference: from the store. Autograd: stacked afresh, so
        that gradients reach each adapter's parameters."""
        if not torch.is_grad_enabled():
            return self.store.gather((*key, dtype, device), members, self.slots, zeros, pack)
        empty = zeros()
        slot_packs = [empty] + [empty if m is None else pack(m) for m in members]
        index = self.slot_index(device)
        return [torch.stack([p[i] for p in slot_packs])[index] for i in range(len(empty))]

    # -- sites ---------------------------------------------------------------------------------

    def apply_site(self, layer: int, position: str, out: torch.Tensor) -> torch.Tensor | None:
        """The sublayer output with this route's adapters applied; None to leave it untouched."""
        if self.single is not None:
            b = self.single.bottleneck(layer, position)
            if b is None:
                return None
            return b.add_to(out, self.take_ffn_input(layer) if b.parallel else out)
        return self._apply_mixed(layer, position, out)

    def _site_plan(self, layer: int, position: str) -> tuple | None:
        """What one site's mixed pass needs besides weights, once per route: the members, the padded
        width r, per-row parallel flags, row indices per activation, each row's bottleneck."""
        key = ("plan", layer, position)
        if key in self.cache:
            return self.cache[key]
        members = self.members((layer, position))
        live = [b for b in members if b is not None]
        plan = None
        if live:
            r = max(b.down.out_features for b in live)
            row_blocks = [None if s == 0 else members[s - 1] for s in self.slots]
            parallel = [b is not None and b.parallel for b in row_blocks]
            activations: dict[str, list[int]] = {}
            for i, b in enumerate(row_blocks):
                if b is not None:
                    activations.setdefault(b.activation, []).append(i)
            plan = members, live[0].down.in_features, r, parallel, activations, row_blocks
        self.cache[key] = plan
        return plan

    def _apply_mixed(self, layer: int, position: str, out: torch.Tensor) -> torch.Tensor | None:
        plan = self._site_plan(layer, position)
        captured = self.take_ffn_input(layer) if position == "ffn" else None
        if plan is None:
            return None
        members, d, r, parallel, activations, row_blocks = plan
        # per call: a route block may span train() / eval() switches
        dropout = [b.dropout if b is not None and b.training else 0.0 for b in row_blocks]
        dtype, device = out.dtype, out.device

        def zeros():
            return (torch.zeros(d, r, dtype=dtype, device=device), torch.zeros(1, r, dtype=dtype, device=device),
                    torch.zeros(r + 1, d, dtype=dtype, device=device))

        # down (B, d, r), down bias (B, 1, r), [up; up bias] * scaling (B, r + 1, d); r zero-padded
        down_w, down_b, up = self._gather(("site", layer, position, r), members, dtype, device, zeros,
                                          lambda b: b.packed(dtype, r, keep=False))
        n = out.shape[0]
        rep = self.check_rows(n)
        if rep > 1:  # generate() repeats each row for beams / return sequences, row by row
            down_w, down_b, up = (self.expand(t, n) for t in (down_w, down_b, up))
            parallel = [p for p in parallel for _ in range(rep)]
            activations = {a: [i * rep + j for i in idx for j in range(rep)] for a, idx in activations.items()}
            dropout = [p for p in dropout for _ in range(rep)]
        shape = out.shape
        x = out.reshape(n, -1, shape[-1])  # (B, T, d)
        z = x
        if captured is not None and any(parallel):
            inp = captured.reshape(x.shape)
            if all(parallel):
                z = inp
            else:
                z = torch.where(torch.tensor(parallel, device=device)[:, None, None], inp, x)
        h = torch.baddbmm(down_b, z, down_w)  # (B, T, r)
        if len(activations) == 1:
            h = ACTIVATION_FNS[next(iter(activations))](h)
        else:  # rows of different activations: each its own (rows without an adapter have h = 0)
            acted = torch.zeros_like(h)
            for name, rows in activations.items():
                index = torch.tensor(rows, device=h.device)
                acted[index] = ACTIVATION_FNS[name](h[index])
            h = acted
        up_w, up_b = up[:, :-1], up[:, -1:]  # (B, r, d), (B, 1, d)
        if any(dropout):
            keep = torch.tensor([1.0 - p for p in dropout], dtype=h.dtype, device=h.device)[:, None, None]
            delta = torch.baddbmm(up_b, h, up_w)
            return (x + delta * torch.bernoulli(keep.expand_as(delta)) / keep).reshape(shape)
        if torch.is_grad_enabled():
            return torch.baddbmm(x, h, up_w).add_(up_b).reshape(shape)
        return x.baddbmm_(h, up_w).add_(up_b).reshape(shape)  # residual + up-projection, one kernel

    # -- norms ---------------------------------------------------------------------------------

    def norm_affine(self, layer: int, index: int, dtype: torch.dtype, device: torch.device):
        """Per-row (scale, shift) of one norm, each (B, 1, d); None when no row's task trains it."""
        members = self.members((layer, index))
        live = next((n for n in members if n is not None), None)
        if live is None:
            return None
        d = live.scale.shape[0]

        def identity():
            return torch.ones(d, dtype=dtype, device=device), torch.zeros(d, dtype=dtype, device=device)

        scale, shift = self._gather(("norm", layer, index), members, dtype, device, identity,
                                    lambda n: (n.scale.to(dtype), n.shift.to(dtype)))
        return scale[:, None], shift[:, None]


class NoAdapters:
    """Route sentinel: this call explicitly uses no adapter, whatever is active by default."""


NO_ADAPTERS = NoAdapters()
# model id -> its route for the current call. A mapping, so that routing one model never affects
# another one (two AdapterModels in one process, or one called inside the other's route block).
_CURRENT: ContextVar[dict[int, Route | NoAdapters] | None] = ContextVar("adapterkit_routes", default=None)


def current_route(owner: object) -> Route | NoAdapters | None:
    routes = _CURRENT.get()
    return None if routes is None else routes.get(id(owner))


@contextmanager
def routed(owner: object, route: Route | NoAdapters):
    """Make ``route`` ``owner``'s route for this thread / asyncio task until the block ends."""
    token = _CURRENT.set({**(_CURRENT.get() or {}), id(owner): route})
    try:
        yield route
    finally:
        _CURRENT.reset(token)
