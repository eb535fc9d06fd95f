"""LoRA, Hu et al. 2021 (arXiv 2106.09685): a low-rank update of chosen projections.

A targeted projection ``y = W x + b`` becomes ``y + s * B A dropout(x)``, with A (r, in) and B (out, r),
s = alpha / r (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023, arXiv 2312.03732). A starts
kaiming-uniform (as the paper's code and PEFT), B at zero: a new adapter is exactly the identity.

Hooks, no copied model code: a pre-hook captures the projection's input ``x``, a forward hook adds the
update to its output. One adapter for the batch: ``x @ A^T`` then one matmul-accumulate into the
output (``addmm_``). A mixed batch gathers each row's (A, s B^T), ranks zero-padded to the widest
(exact: padded units have zero weights in and out; rows without a LoRA get zeros), and runs ``bmm`` +
``baddbmm_``. ``AdapterModel.merge_adapter`` folds ``s B A`` into the weights for single-task serving.

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

TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
DEFAULT_TARGETS = ("q", "v")
DEFAULT_RANK = 8


class LoraSite(SiteModule):
    """One projection's low-rank update: parameters ``A`` (r, n_in) and ``B`` (n_out, r)."""

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

    @staticmethod
    def dims_from_tensors(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        """(in, out) as a file's ``A`` (r, in) and ``B`` (out, r) show them (0 where absent or malformed:
        the shape check then names the tensor)."""
        a, b = shapes.get("A", ()), shapes.get("B", ())
        return (a[1] if len(a) == 2 else 0), (b[0] if len(b) == 2 else 0)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        p = self._parameters
        return p["A"], p["B"]

    @property
    def rank(self) -> int:
        return self._parameters["A"].shape[0]

    def delta_weight(self) -> torch.Tensor:
        """``s B A`` (n_out, n_in): what merging adds to the projection's (out, in) weight."""
        return (self.B @ self.A) * self.scale

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Add the update to a projection's weight, given as an (out, in) view."""
        weight.add_(self.delta_weight().to(weight.dtype))

    def packed(self, dtype: torch.dtype, width: int | None = None, keep: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T (n_in, width) and s B^T (width, n_out), the rank zero-padded to ``width``; with ``keep``,
        cached while autograd is off and rebuilt when a weight changes."""
        A, B = self.params
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
        A, B = self.params
        pad = width - A.shape[0]
        return F.pad(A.to(dtype), (0, 0, 0, pad)), F.pad((B.t() * self.scale).to(dtype), (0, 0, 0, pad))

    def apply_single(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """``out + s * dropout(z) A^T B^T`` for every row: (..., n_out) from z (..., n_in)."""
        if self.merged or z is None:
            return None
        if self.dropout and self.training:
            z = F.dropout(z, self.dropout, True)
        a_t, b_t = self.packed(out.dtype)
        h = z.reshape(-1, a_t.shape[0]).to(out.dtype) @ a_t  # (N, r)
        flat = out.reshape(-1, out.shape[-1])  # a view when out is contiguous
        if torch.is_grad_enabled():
            return torch.addmm(flat, h, b_t).view(out.shape)
        return flat.addmm_(h, b_t).view(out.shape)  # into the projection's fresh output

    # -- mixed batches ---------------------------------------------------------------------------

    @classmethod
    def mixed_plan(cls, members: list[LoraSite | None], slots: list[int]) -> tuple | None:
        """The members, n_in, n_out, the padded rank, each row's module."""
        live = [m for m in members if m is not None]
        if not live:
            return None
        r = max(m.rank for m in live)
        n_out, n_in = live[0].B.shape[0], live[0].A.shape[1]
        row_modules = [None if s == 0 else members[s - 1] for s in slots]
        return members, n_in, n_out, r, row_modules

    @classmethod
    def apply_mixed(
        cls, route: Route, layer: int, position: str, plan: tuple, out: torch.Tensor, captured: torch.Tensor | None
    ) -> torch.Tensor:
        members, n_in, n_out, r, row_modules = plan
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
        if torch.is_grad_enabled():  # x @ A^T, as the single path: gradients sum in the same order
            h = torch.bmm(x, a.transpose(1, 2))  # (B, T, r)
            return torch.baddbmm(y, h, b_t).reshape(out.shape)
        # h^T = A x^T (B, r, T): with r small, a few times faster on CPU than x @ A^T (the GEMM's
        # wide side is then T, not r); the up-projection reads h as its transposed view
        h = torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)  # (B, T, r)
        return y.baddbmm_(h, b_t).reshape(out.shape)


def _prepare(config: AdapterConfig) -> None:
    """LoRA's defaults and checks, before the common ones: rank 8, targets q and v."""
    if config.bottleneck_size is None and config.reduction_factor is None:
        config.bottleneck_size = DEFAULT_RANK
    targets = list(DEFAULT_TARGETS) if config.targets is None else config.targets
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets or not isinstance(targets, list):
        raise ValueError(f"LoRA targets must be a non-empty list of {', '.join(TARGETS)}; got {config.targets!r}")
    config.targets = [t for t in TARGETS if t in targets]  # canonical order, no duplicates
    if config.alpha is not None and (isinstance(config.alpha, bool) or not isinstance(config.alpha, int | float) or not config.alpha > 0):
        raise ValueError(f"AdapterConfig.alpha must be a positive number; got {config.alpha!r}")
    if config.alpha is not None:
        config.alpha = float(config.alpha)
    if not isinstance(config.rslora, bool):
        raise ValueError(f"AdapterConfig.rslora must be True or False; got {config.rslora!r}")
    if config.scaling not in (None, 1.0):
        raise ValueError("LoRA is scaled by alpha / r: set alpha (and rslora), not scaling")


KIND = AdapterKind(
    name="lora",
    sites={t: "input" for t in TARGETS},
    module=LoraSite,
    summary="low-rank update of chosen projections (rank, alpha, targets q,k,v,o,up,gate,down)",
    order=110,
    sized_by_site=True,
    prepare=_prepare,
    select=lambda config: tuple(config.targets or DEFAULT_TARGETS),
)
