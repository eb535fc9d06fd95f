"""The bottleneck: down (d -> r), activation, up (r -> d), dropout, scaling; serial or parallel.

The module and maths shared by the bottleneck kinds (houlsby, pfeiffer, parallel, ...): each kind
module only says where bottlenecks go and what feeds them. Serial bottlenecks add ``delta(out)`` to the
sublayer's output ``out`` (that sum is the adapter's skip connection); parallel ones add ``delta(inp)``,
fed by the sublayer's input.

Shapes: B rows, T tokens, d hidden size, r bottleneck width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..stacks import weights_key
from .interface import SiteModule

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..routing import Route

ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Bottleneck(SiteModule):
    """down (d -> r) -> activation -> up (r -> d) -> dropout -> * scaling: the delta an adapter adds.

    Both projections start from a truncated N(0, init_std) and zero biases, so a new adapter is close
    to the identity. ``feed``: ``"output"`` (serial) or ``"input"`` (parallel).
    """

    def __init__(self, hidden_size: int, config: AdapterConfig, feed: str = "output", **factory: Any):
        super().__init__()
        r = config.bottleneck_for(hidden_size)
        self.down = nn.Linear(hidden_size, r, **factory)
        self.up = nn.Linear(r, hidden_size, **factory)
        self.activation = config.activation
        self.scaling = config.scaling
        self.feed = feed
        self.dropout = config.dropout
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=config.init_std, a=-2 * config.init_std, b=2 * config.init_std)
            nn.init.zeros_(linear.bias)

    @property
    def parallel(self) -> bool:
        """Fed by the sublayer's input rather than its output."""
        return self.feed == "input"

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """(down.weight, down.bias, up.weight, up.bias), read live (``load_state_dict(assign=True)``
        replaces Parameter objects) through plain dicts: the per-call paths read these thousands of times."""
        down, up = self._modules["down"]._parameters, self._modules["up"]._parameters
        return down["weight"], down["bias"], up["weight"], up["bias"]

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

    def apply_single(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
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

    add_to = apply_single

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

    # -- mixed batches ---------------------------------------------------------------------------

    @classmethod
    def mixed_plan(cls, members: list[Bottleneck | None], slots: list[int]) -> tuple | None:
        """The members, d, the padded width r, per-row input-fed flags, row indices per activation,
        each row's bottleneck."""
        live = [b for b in members if b is not None]
        if not live:
            return None
        r = max(b.down.out_features for b in live)
        row_blocks = [None if s == 0 else members[s - 1] for s in slots]
        parallel = [b is not None and b.feed == "input" for b in row_blocks]
        activations: dict[str, list[int]] = {}
        for i, b in enumerate(row_blocks):
            if b is not None:
                activations.setdefault(b.activation, []).append(i)
        return members, live[0].down.in_features, r, parallel, activations, row_blocks

    @classmethod
    def apply_mixed(
        cls, route: Route, layer: int, position: str, plan: tuple, out: torch.Tensor, captured: torch.Tensor | None
    ) -> torch.Tensor:
        members, d, r, parallel, activations, row_blocks = plan
        # per call: a route block may span train() / eval() switches
        dropout = [b.dropout if b is not None and b.training else 0.0 for b in row_blocks]
        dtype, device = out.dtype, out.device

        def zeros():
            return (torch.zeros(d, r, dtype=dtype, device=device), torch.zeros(1, r, dtype=dtype, device=device),
                    torch.zeros(r + 1, d, dtype=dtype, device=device))

        # down (B, d, r), down bias (B, 1, r), [up; up bias] * scaling (B, r + 1, d); r zero-padded
        down_w, down_b, up = route.gather(("site", layer, position, r), members, dtype, device, zeros,
                                          lambda b: b.packed(dtype, r, keep=False))
        n = out.shape[0]
        rep = route.check_rows(n)
        if rep > 1:  # generate() repeats each row for beams / return sequences, row by row
            down_w, down_b, up = (route.expand(t, n) for t in (down_w, down_b, up))
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
