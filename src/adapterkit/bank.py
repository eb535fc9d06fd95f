"""Bottleneck maths, one task's adapter, and per-row routing of a batch over many adapters.

Shapes: B rows, T tokens, d hidden size, r bottleneck width, K distinct adapters in a batch.
"""

from __future__ import annotations

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

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        dt = z.dtype  # weights may be kept in float32 under a bf16/fp16 base
        h = F.linear(z, self.down.weight.to(dt), self.down.bias.to(dt))
        h = ACTIVATION_FNS[self.activation](h)
        delta = F.linear(h, self.up.weight.to(dt), self.up.bias.to(dt))
        if self.scaling != 1.0:
            delta = delta * self.scaling
        return F.dropout(delta, self.dropout, self.training) if self.dropout else delta


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

    def bottleneck(self, layer: int, position: str) -> Bottleneck | None:
        la = self.layers[layer]
        return None if la is None else getattr(la, position)

    def norm(self, layer: int, index: int) -> NormAffine | None:
        la = self.layers[layer]
        return la.norms[index] if la is not None and index < len(la.norms) else None


# ---------------------------------------------------------------------------------------------
# Routing: which adapter each row of the current forward pass uses
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Route:
    """The adapters of one forward call (or one ``generate`` call), row by row.

    ``single`` is set when every row uses the same adapter: then sites run that adapter's own
    parameters on the whole batch (no gather, no copies). Otherwise ``rows`` holds each row's adapter
    (None: no adapter) and sites gather per-row weights once per call, cached here.
    """

    rows: list[TaskAdapter | None]
    single: TaskAdapter | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)  # FFN inputs for parallel adapters
    cache: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def for_rows(cls, rows: list[TaskAdapter | None]) -> Route | None:
        unique = {id(a): a for a in rows}
        if len(unique) == 1:
            only = rows[0]
            return None if only is None else cls(rows, single=only)
        return cls(rows)

    @property
    def adapters(self) -> list[TaskAdapter]:
        """Distinct adapters in this route, in first-seen order."""
        return list({id(a): a for a in self.rows if a is not None}.values())

    def needs_ffn_input(self, layer: int) -> bool:
        key = ("parallel", layer)
        if key not in self.cache:
            self.cache[key] = any(
                (b := a.bottleneck(layer, "ffn")) is not None and b.parallel for a in self.adapters
            )
        return self.cache[key]

    def _row_index(self, n: int, device: torch.device) -> torch.Tensor:
        """Row -> slot index (0 = no adapter), expanded when generate() repeats rows (beams)."""
        key = ("index", n, device)
        if key not in self.cache:
            slots = {id(a): k + 1 for k, a in enumerate(self.adapters)}
            idx = torch.tensor([slots.get(id(a), 0) for a in self.rows], device=device)
            b = len(self.rows)
            if n % b:
                raise ValueError(f"adapter route has {b} rows but the batch at this layer has {n}")
            self.cache[key] = idx.repeat_interleave(n // b) if n != b else idx
        return self.cache[key]

    # -- sites ---------------------------------------------------------------------------------

    def apply_site(self, layer: int, position: str, out: torch.Tensor) -> torch.Tensor | None:
        """The sublayer output with this route's adapters applied; None to leave it untouched."""
        if self.single is not None:
            b = self.single.bottleneck(layer, position)
            if b is None:
                return None
            z = self.captured.pop(layer) if b.parallel else out
            delta = b(z)
            if torch.is_grad_enabled():
                return out + delta
            return out.add_(delta)  # the projection's own fresh output: safe to reuse without autograd
        return self._apply_mixed(layer, position, out)

    def _stacked(self, layer: int, position: str, dtype: torch.dtype, device: torch.device):
        """Per-slot weights for one site, slot 0 all zeros: (K+1, d, r) etc., r padded to the widest."""
        key = ("site", layer, position, dtype, device)
        if key in self.cache:
            return self.cache[key]
        blocks = [a.bottleneck(layer, position) for a in self.adapters]
        live = [b for b in blocks if b is not None]
        if not live:
            self.cache[key] = None
            return None
        d = live[0].down.in_features
        r = max(b.down.out_features for b in live)
        k = len(blocks) + 1
        zeros = dict(dtype=dtype, device=device)
        down_w, down_b = torch.zeros(k, d, r, **zeros), torch.zeros(k, 1, r, **zeros)
        up_w, up_b = torch.zeros(k, r, d, **zeros), torch.zeros(k, 1, d, **zeros)
        parallel = torch.zeros(k, dtype=torch.bool, device=device)
        keep = torch.ones(k, 1, 1, dtype=dtype, device=device)
        activations: dict[str, list[int]] = {}
        for slot, b in enumerate(blocks, start=1):
            if b is None:
                continue
            w = b.down.out_features
            # Zero padding of r is exact: padded units get zero input weights and zero output weights.
            down_w[slot, :, :w] = b.down.weight.t()
            down_b[slot, 0, :w] = b.down.bias
            up_w[slot, :w] = b.up.weight.t() * b.scaling
            up_b[slot, 0] = b.up.bias * b.scaling
            parallel[slot] = b.parallel
            keep[slot] = 1.0 - (b.dropout if b.training else 0.0)
            activations.setdefault(b.activation, []).append(slot)
        entry = (down_w, down_b, up_w, up_b, parallel, keep, activations)
        self.cache[key] = entry
        return entry

    def _apply_mixed(self, layer: int, position: str, out: torch.Tensor) -> torch.Tensor | None:
        stacked = self._stacked(layer, position, out.dtype, out.device)
        if stacked is None:
            if position == "ffn":
                self.captured.pop(layer, None)
            return None
        down_w, down_b, up_w, up_b, parallel, keep, activations = stacked
        idx = self._row_index(out.shape[0], out.device)  # (B,)
        shape = out.shape
        x = out.reshape(shape[0], -1, shape[-1])  # (B, T, d)
        row_parallel = parallel[idx]
        if position == "ffn" and layer in self.captured:
            inp = self.captured.pop(layer).reshape(x.shape)
            z = torch.where(row_parallel[:, None, None], inp, x) if not row_parallel.all() else inp
        else:
            z = x
        h = torch.baddbmm(down_b[idx], z, down_w[idx])  # (B, T, r)
        if len(activations) == 1:
            h = ACTIVATION_FNS[next(iter(activations))](h)
        else:  # rows of different activations: each row gets its own (any of them maps 0 to 0)
            slot_act = {s: name for name, slots in activations.items() for s in slots}
            acted = torch.zeros_like(h)
            for name in activations:
                rows = torch.tensor([slot_act.get(int(s)) == name for s in idx], device=h.device)
                acted[rows] = ACTIVATION_FNS[name](h[rows])
            h = acted
        delta = torch.baddbmm(up_b[idx], h, up_w[idx])  # (B, T, d), scaling folded into up
        if any(a.training for a in self.adapters) and bool((keep < 1).any()):
            k = keep[idx]
            delta = delta * torch.bernoulli(k.expand_as(delta)) / k
        return (x + delta).reshape(shape)

    # -- norms ---------------------------------------------------------------------------------

    def norm_affine(self, layer: int, index: int, dtype: torch.dtype, device: torch.device):
        """Per-row (scale, shift) of one norm, shapes (B', 1, d); None when no row's task trains it."""
        key = ("norm", layer, index, dtype, device)
        if key not in self.cache:
            norms = [a.norm(layer, index) for a in self.adapters]
            if all(n is None for n in norms):
                self.cache[key] = None
            else:
                d = next(n for n in norms if n is not None).scale.shape[0]
                scale = torch.ones(len(norms) + 1, 1, d, dtype=dtype, device=device)
                shift = torch.zeros(len(norms) + 1, 1, d, dtype=dtype, device=device)
                for slot, n in enumerate(norms, start=1):
                    if n is not None:
                        scale[slot, 0] = n.scale
                        shift[slot, 0] = n.shift
                self.cache[key] = (scale, shift)
        return self.cache[key]


class NoAdapters:
    """Route sentinel: this call explicitly uses no adapter, whatever is active by default."""


NO_ADAPTERS = NoAdapters()
_CURRENT: ContextVar[Route | NoAdapters | None] = ContextVar("adapterkit_route", default=None)


def current_route() -> Route | NoAdapters | None:
    return _CURRENT.get()


@contextmanager
def routed(route: Route | NoAdapters | None):
    """Make ``route`` the current one for this thread / asyncio task until the block ends."""
    token = _CURRENT.set(route)
    try:
        yield route
    finally:
        _CURRENT.reset(token)
