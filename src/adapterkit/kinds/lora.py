"""LoRA, Hu et al. 2021 (arXiv 2106.09685): a low-rank update of chosen projections.

A targeted projection ``y = W x + b`` becomes ``y + s * B A dropout(x)``, with A (r, in) and B (out, r),
s = alpha / r (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023, arXiv 2312.03732). A starts
kaiming-uniform (as the paper's code and PEFT), B at zero: a new adapter is exactly the identity.

Hooks, no copied model code: a pre-hook captures the projection's input ``x``, a forward hook adds the
update to its output. One adapter for the batch: ``x @ A^T`` then one matmul-accumulate into the
output (``addmm_``). A mixed batch gathers each row's (A, s B^T), ranks zero-padded to the widest
(exact: padded units have zero weights in and out; rows without a LoRA get zeros), and runs ``bmm`` +
``baddbmm_``. ``AdapterModel.merge_adapter`` folds ``s B A`` into the weights for single-task serving.

DoRA (``AdapterConfig(dora=True)``; Liu et al. 2024, arXiv 2402.09353, PEFT's ``use_dora``): the
weight is split into a direction and a learned per-output-feature magnitude m (n_out,),
``W' = m * (W + s B A) / ||W + s B A||`` with the norm of each output feature's row (over the input
axis of the (out, in) weight). m starts at ``||W||``, so a new adapter is still exactly the identity;
the norm is a constant in backprop (detached, the paper's section 4.3, as PEFT). In the hook, with
``out = W x + b``, ``u = out + s B A x`` and ``g = m / ||W + s B A||`` (n_out,):
``y = b + g * (u - b)``, computed as ``u + (g - 1) * (u - b)`` so that g = 1 (a new adapter, or a row
without DoRA in a mixed batch) leaves ``u`` bit for bit. Dropout as PEFT: while training with
dropout, the input of both the low-rank path and the base term is dropped,
``y = out + (g - 1) * W drop(x) + g * s B A drop(x)``. The module reads the hooked projection's weight
(and bias) through ``bind_projection`` (a reference, never a copy); g is cached under inference,
keyed on A, B, m and that weight. Mixed batches gather each row's g (B, n_out), ones for rows without
DoRA; without any DoRA adapter at a site the plain LoRA path runs unchanged.

Targets, by role (``sites.py``): q, k, v, o (attention), up, gate, down (FFN); default q and v.
Shapes: B rows, T tokens, n_in / n_out the projection's features, r the rank.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..stacks import weights_key
from .interface import AdapterKind, SiteModule

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..routing import Route
    from ..sites import Part

TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
DEFAULT_TARGETS = ("q", "v")
DEFAULT_RANK = 8


def direction_norm(weight: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA's ``||W + delta||`` per output feature: (n_out,) float32 from an (n_out, n_in) weight and
    update (default zero: ``||W||``, bit for bit what a new DoRA module's magnitude starts at)."""
    with torch.no_grad():
        if delta is None:
            delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        return torch.linalg.vector_norm(weight.detach().float() + delta, dim=1)


class LoraSite(SiteModule):
    """One projection's low-rank update: parameters ``A`` (r, n_in) and ``B`` (n_out, r); with DoRA
    also ``magnitude`` (n_out,)."""

    def __init__(
        self,
        hidden_size: int,
        config: AdapterConfig,
        feed: str = "input",
        dims: tuple[int, int] = (0, 0),
        position: str = "",
        **factory: Any,
    ):
        super().__init__()
        n_in, n_out = dims
        r = config.bottleneck_for(hidden_size)
        self.feed = feed  # "input": fed by the projection's own input
        self.A = nn.Parameter(torch.empty(r, n_in, **factory))
        self.B = nn.Parameter(torch.zeros(n_out, r, **factory))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear, the paper's code and PEFT
        alpha = float(config.alpha if config.alpha is not None else r)
        self.scale = alpha / math.sqrt(r) if config.rslora else alpha / r
        self.dropout = config.dropout
        self.merged = False  # set by AdapterModel.merge_adapter: the update is in the base weights
        self.dora = bool(getattr(config, "dora", False))
        if self.dora:  # ||W|| per output feature once bound to its projection (bind_projection)
            self.magnitude = nn.Parameter(torch.ones(n_out, **factory))

    @staticmethod
    def dims_from_tensors(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        """(in, out) as a file's ``A`` (r, in) and ``B`` (out, r) show them (0 where absent or malformed:
        the shape check then names the tensor)."""
        a, b = shapes.get("A", ()), shapes.get("B", ())
        return (a[1] if len(a) == 2 else 0), (b[0] if len(b) == 2 else 0)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """A, B; with DoRA also the magnitude and the base projection's weight, which g depends on
        (so that ``weights_key`` and the mixed-batch stacks see a change of either)."""
        p = self._parameters
        if not self.dora:
            return p["A"], p["B"]
        bound = self.__dict__.get("_projection")
        return (p["A"], p["B"], p["magnitude"]) + (() if bound is None else (bound[0].weight,))

    # -- DoRA: the base projection, the magnitude's scale ------------------------------------------

    def bind_projection(self, projection: nn.Module, part: Part | None) -> None:
        """Give a DoRA module the projection it adapts (``part``: its rows of a fused one, GPT-2's
        ``c_attn``), kept by reference, and start the magnitude at ``||W||`` per output feature (a file's
        magnitude, loaded afterwards, replaces it). No-op without DoRA."""
        if not self.dora:
            return
        self.__dict__["_projection"] = (projection, part)  # a plain attribute: not a submodule, not saved
        with torch.no_grad():
            self.magnitude.copy_(self._weight_norm())

    def base_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The bound projection's weight as (n_out, n_in) and its bias (n_out,) or None: views, or copies
        of a fused projection's rows interleaved per head."""
        bound = self.__dict__.get("_projection")
        if bound is None:
            raise ValueError("a DoRA LoRA module needs its projection's weight: it was built outside an AdapterModel")
        projection, part = bound
        weight, bias = projection.weight, getattr(projection, "bias", None)
        w = weight if isinstance(projection, nn.Linear) else weight.t()  # Conv1D (GPT-2) keeps (in, out)
        if part is not None:
            w, bias = part.take(w, 0), None if bias is None else part.take(bias, 0)
        return w, bias

    def _weight_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``||W + s B A||`` per output feature (n_out,) in the magnitude's dtype, out of the autograd
        graph (a constant in backprop). The same expression starts the magnitude, so that with B = 0
        the scale is exactly 1."""
        w = self.base_weight()[0] if weight is None else weight
        with torch.no_grad():
            delta = (self.B.detach().float() @ self.A.detach().float()) * self.scale  # (n_out, n_in)
            return direction_norm(w, delta).to(self.magnitude.dtype)

    def dora_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """g = m / ||W + s B A|| (n_out,) in ``dtype``; cached while autograd is off and rebuilt when
        A, B, m or the base weight change. Under autograd it carries the gradient to m."""
        grad = torch.is_grad_enabled()
        key = (dtype, *weights_key(self))
        cached = self.__dict__.get("_dora_scale")
        if not grad and cached is not None and cached[0] == key and cached[1].is_inference() == torch.is_inference_mode_enabled():
            return cached[1]
        g = (self.magnitude / self._weight_norm()).to(dtype)
        if not grad:
            self.__dict__["_dora_scale"] = (key, g)
        return g

    @property
    def rank(self) -> int:
        return self._parameters["A"].shape[0]

    def delta_weight(self) -> torch.Tensor:
        """``s B A`` (n_out, n_in): what merging adds to the projection's (out, in) weight."""
        return (self.B @ self.A) * self.scale

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Add the update to a projection's weight, given as an (out, in) view; DoRA:
        ``W <- g * (W + s B A)`` row by row, the bias unchanged (it is outside the direction)."""
        if not self.dora:
            weight.add_(self.delta_weight().to(weight.dtype))
            return
        g = (self.magnitude / self._weight_norm(weight)).float()  # from the unmerged weight
        weight.copy_((g[:, None] * (weight.float() + self.delta_weight().float())).to(weight.dtype))

    def packed(self, dtype: torch.dtype, width: int | None = None, keep: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T (n_in, width) and s B^T (width, n_out), the rank zero-padded to ``width``; with ``keep``,
        cached while autograd is off and rebuilt when a weight changes."""
        A, B = self.A, self.B
        width = width or A.shape[0]
        grad = torch.is_grad_enabled()
        key = (dtype, width, A.device, *weights_key(self))
        cached = self.__dict__.get("_packed")
        if not grad and cached is not None and cached[0] == key and cached[1][0].is_inference() == torch.is_inference_mode_enabled():
            return cached[1]
        pad = width - A.shape[0]
        a_t = F.pad(A.t().to(dtype), (0, pad))
        b_t = F.pad((B.t() * self.scale).to(dtype), (0, 0, 0, pad))
        if keep and not grad:
            self.__dict__["_packed"] = (key, (a_t, b_t))
        return a_t, b_t

    def mixed_pack(self, dtype: torch.dtype, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (width, n_in) and s B^T (width, n_out), the rank zero-padded to ``width``: one row's
        weights in a mixed batch's stacks (copied in once; under autograd, in the call's graph)."""
        A, B = self.A, self.B
        pad = width - A.shape[0]
        return F.pad(A.to(dtype), (0, 0, 0, pad)), F.pad((B.t() * self.scale).to(dtype), (0, 0, 0, pad))

    def apply_single(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """``out + s * dropout(z) A^T B^T`` for every row: (..., n_out) from z (..., n_in)."""
        if self.merged or z is None:
            return None
        if self.dora:
            return self._apply_dora(out, z)
        if self.dropout and self.training:
            z = F.dropout(z, self.dropout, True)
        a_t, b_t = self.packed(out.dtype)
        h = z.reshape(-1, a_t.shape[0]).to(out.dtype) @ a_t  # (N, r)
        flat = out.reshape(-1, out.shape[-1])  # a view when out is contiguous
        if torch.is_grad_enabled():
            return torch.addmm(flat, h, b_t).view(out.shape)
        return flat.addmm_(h, b_t).view(out.shape)  # into the projection's fresh output

    def _apply_dora(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """DoRA on every row: ``u + (g - 1) * d`` with ``u = out + s B A x`` and ``d = u - b`` (while
        training with dropout: ``W drop(x) + s B A drop(x)``, PEFT's base term)."""
        dtype, n_out = out.dtype, out.shape[-1]
        drop = bool(self.dropout and self.training)
        if drop:
            z = F.dropout(z, self.dropout, True)
        a_t, b_t = self.packed(dtype)
        x = z.reshape(-1, a_t.shape[0]).to(dtype)  # (N, n_in)
        h = x @ a_t  # (N, r)
        flat = out.reshape(-1, n_out)  # (N, n_out)
        g1 = self.dora_scale(dtype) - 1  # (n_out,)
        weight, bias = self.base_weight()
        grad = torch.is_grad_enabled()
        u = torch.addmm(flat, h, b_t) if grad else flat.addmm_(h, b_t)
        if drop:
            d = torch.addmm(F.linear(x, weight.to(dtype)), h, b_t)  # W drop(x) + s B A drop(x)
        else:
            d = u if bias is None else u - bias.to(dtype)
        return (torch.addcmul(u, d, g1) if grad else u.addcmul_(d, g1)).view(out.shape)

    # -- mixed batches ---------------------------------------------------------------------------

    @classmethod
    def mixed_plan(cls, members: list[LoraSite | None], slots: list[int]) -> tuple | None:
        """The members, n_in, n_out, the padded rank, each row's module, a DoRA member (or None)."""
        live = [m for m in members if m is not None]
        if not live:
            return None
        r = max(m.rank for m in live)
        n_out, n_in = live[0].B.shape[0], live[0].A.shape[1]
        row_modules = [None if s == 0 else members[s - 1] for s in slots]
        dora = next((m for m in live if m.dora), None)
        return members, n_in, n_out, r, row_modules, dora

    @classmethod
    def apply_mixed(
        cls, route: Route, layer: int, position: str, plan: tuple, out: torch.Tensor, captured: torch.Tensor | None
    ) -> torch.Tensor:
        members, n_in, n_out, r, row_modules, dora = plan
        dtype, device = out.dtype, out.device

        def zeros():
            return torch.zeros(r, n_in, dtype=dtype, device=device), torch.zeros(r, n_out, dtype=dtype, device=device)

        # A (B, r, n_in), s B^T (B, r, n_out); r zero-padded; zeros for rows without a LoRA here
        a, b_t = route.gather(("lora", layer, position, r), members, dtype, device, zeros,
                              lambda m: m.mixed_pack(dtype, r))
        n = out.shape[0]
        rep = route.check_rows(n)
        if rep > 1:  # generate() repeats each row for beams / return sequences
            a, b_t = route.expand(a, n), route.expand(b_t, n)
        x = captured.reshape(n, -1, n_in).to(dtype)  # (B, T, n_in)
        dropout = [m.dropout if m is not None and m.training else 0.0 for m in row_modules]
        if any(dropout):  # per-row dropout of the LoRA input (rows of p = 0 are kept exactly)
            keep = torch.tensor([1.0 - p for p in dropout for _ in range(rep)], dtype=dtype, device=device)[:, None, None]
            x = x * torch.bernoulli(keep.expand_as(x)) / keep
        y = out.reshape(n, -1, n_out)  # (B, T, n_out)
        if dora is not None:
            return cls._mixed_dora(route, layer, position, plan, y, x, a, b_t, dropout, rep).reshape(out.shape)
        if torch.is_grad_enabled():  # x @ A^T, as the single path: gradients sum in the same order
            h = torch.bmm(x, a.transpose(1, 2))  # (B, T, r)
            return torch.baddbmm(y, h, b_t).reshape(out.shape)
        # h^T = A x^T (B, r, T): with r small, a few times faster on CPU than x @ A^T (the GEMM's
        # wide side is then T, not r); the up-projection reads h as its transposed view
        h = torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)  # (B, T, r)
        return y.baddbmm_(h, b_t).reshape(out.shape)

    @classmethod
    def _mixed_dora(cls, route: Route, layer: int, position: str, plan: tuple, y: torch.Tensor, x: torch.Tensor,
                    a: torch.Tensor, b_t: torch.Tensor, dropout: list[float], rep: int) -> torch.Tensor:
        """A mixed pass where some row has DoRA: ``u + (g - 1) * d`` per row, g gathered (B, n_out),
        ones for rows without DoRA (their u comes out bit for bit). y (B, T, n_out), x (B, T, n_in),
        already dropped where that row's adapter drops."""
        members, n_in, n_out, r, row_modules, dora = plan
        dtype, device = y.dtype, y.device
        n = y.shape[0]

        def ones():
            return (torch.ones(n_out, dtype=dtype, device=device),)

        (g,) = route.gather(("dora", layer, position), members, dtype, device, ones,
                            lambda m: (m.dora_scale(dtype),) if m.dora else ones())
        if rep > 1:
            g = route.expand(g, n)
        g1 = (g - 1)[:, None, :]  # (B, 1, n_out)
        weight, bias = dora.base_weight()  # every member here adapts the same projection
        h = torch.bmm(x, a.transpose(1, 2))  # (B, T, r)
        grad = torch.is_grad_enabled()
        u = torch.baddbmm(y, h, b_t) if grad else y.baddbmm_(h, b_t)  # out + s B A x
        d = u if bias is None else u - bias.to(dtype)
        dropped = [p > 0 and m is not None and m.dora for p, m in zip(dropout, row_modules)]
        if any(dropped):  # PEFT's base term under dropout: W drop(x) (+ s B A drop(x)) on those rows
            mask = torch.tensor([k for k in dropped for _ in range(rep)], device=device)[:, None, None]
            d = torch.where(mask, torch.baddbmm(F.linear(x, weight.to(dtype)), h, b_t), d)
        return torch.addcmul(u, d, g1) if grad else u.addcmul_(d, g1)


def _prepare(config: AdapterConfig) -> None:
    """LoRA's defaults and checks, before the common ones: rank 8, targets q and v."""
    if config.bottleneck_size is None and config.reduction_factor is None:
        config.bottleneck_size = DEFAULT_RANK
    targets = list(DEFAULT_TARGETS) if config.targets is None else config.targets
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets or not isinstance(targets, list):
        raise ValueError(f"LoRA targets must be a non-empty list of {', '.join(TARGETS)}; got {config.targets!r}")
    config.targets = [t for t in TARGETS if t in targets]  # canonical order, no duplicates
    if config.alpha is not None and (isinstance(config.alpha, bool) or not isinstance(config.alpha, int | float)
                                     or not 0 < config.alpha < math.inf):  # config.is_finite_number (it imports us)
        raise ValueError(f"AdapterConfig.alpha must be a finite positive number; got {config.alpha!r}")
    if config.alpha is not None:
        config.alpha = float(config.alpha)
    if not isinstance(config.rslora, bool):
        raise ValueError(f"AdapterConfig.rslora must be True or False; got {config.rslora!r}")
    if config.scaling not in (None, 1.0):
        raise ValueError("LoRA is scaled by alpha / r: set alpha (and rslora), not scaling")
    if not isinstance(getattr(config, "dora", False), bool):
        raise ValueError(f"AdapterConfig.dora must be True or False; got {config.dora!r}")


KIND = AdapterKind(
    name="lora",
    sites={t: "input" for t in TARGETS},
    module=LoraSite,
    summary="low-rank update of chosen projections (rank, alpha, targets q,k,v,o,up,gate,down; dora)",
    order=110,
    sized_by_site=True,
    prepare=_prepare,
    select=lambda config: tuple(config.targets or DEFAULT_TARGETS),
)
