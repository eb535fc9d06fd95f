"""IA3, Liu et al. 2022 ((IA)^3, arXiv 2205.05638): learned vectors that rescale the attention's keys
and values and the FFN's inner activation.

``k -> l_k * k``, ``v -> l_v * v`` (forward hooks on the key and value projections' outputs) and
``h -> l_ff * h`` for the FFN's inner activation h, the input of its output projection (a forward
pre-hook that rewrites that input). Vectors start at one: a new adapter is exactly the identity. A
mixed batch gathers each row's vector (ones for rows without one) and multiplies. Merging multiplies
the projections' weights (rows for k and v, with their biases; columns of the FFN's output projection).

Targets, by role: k, v, ff (default all three, as in the paper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .interface import AdapterKind, SiteModule

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..routing import Route

TARGETS = ("k", "v", "ff")


class IA3Site(SiteModule):
    """One learned vector ``l`` scaling a projection's output (k, v) or its input (ff)."""

    def __init__(
        self,
        hidden_size: int,
        config: AdapterConfig,
        feed: str = "output",
        dims: tuple[int, int] = (0, 0),
        position: str = "",
        **factory: Any,
    ):
        super().__init__()
        self.feed = feed
        self.on_input = position == "ff"  # scales the input of the FFN's output projection
        self.l = nn.Parameter(torch.ones(dims[0] if self.on_input else dims[1], **factory))
        self.merged = False

    @staticmethod
    def dims_from_tensors(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        """(n, n) from a file's vector ``l`` (n,): only its length is known without the model."""
        n = shapes.get("l", ())
        size = n[0] if len(n) == 1 else 0
        return size, size

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self._parameters["l"],)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Fold the scaling into a projection's (out, in) weight view (and bias, for outputs)."""
        gain = self.l.to(weight.dtype)
        if self.on_input:
            weight.mul_(gain[None, :])
        else:
            weight.mul_(gain[:, None])
            if bias is not None:
                bias.mul_(gain.to(bias.dtype))

    def apply_single(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """``out * l`` (..., n); in place on a projection's fresh output while autograd is off, never
        on an input the model handed to the next module (it may hold other references)."""
        if self.merged:
            return None
        gain = self.l.to(out.dtype)
        if torch.is_grad_enabled() or self.on_input:
            return out * gain
        return out.mul_(gain)

    @classmethod
    def mixed_plan(cls, members: list[IA3Site | None], slots: list[int]) -> tuple | None:
        live = [m for m in members if m is not None]
        if not live:
            return None
        return members, live[0].l.shape[0], live[0].on_input

    @classmethod
    def apply_mixed(
        cls, route: Route, layer: int, position: str, plan: tuple, out: torch.Tensor, captured: torch.Tensor | None
    ) -> torch.Tensor:
        members, size, on_input = plan
        dtype, device = out.dtype, out.device

        def ones():  # the identity: rows without an IA3 vector here
            return (torch.ones(size, dtype=dtype, device=device),)

        (gain,) = route.gather(("ia3", layer, position), members, dtype, device, ones, lambda m: (m.l.to(dtype),))
        n = out.shape[0]
        gain = route.expand(gain, n)[:, None, :]  # (B, 1, n)
        y = out.reshape(n, -1, size)
        if torch.is_grad_enabled() or on_input:
            return (y * gain).reshape(out.shape)
        return y.mul_(gain).reshape(out.shape)


def _prepare(config: AdapterConfig) -> None:
    targets = list(TARGETS) if config.targets is None else config.targets
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets or not isinstance(targets, list):
        raise ValueError(f"IA3 targets must be a non-empty list of {', '.join(TARGETS)}; got {config.targets!r}")
    config.targets = [t for t in TARGETS if t in targets]
    if config.alpha is not None or config.rslora:
        raise ValueError("alpha and rslora are LoRA options; IA3 takes neither")
    if config.scaling not in (None, 1.0):
        raise ValueError("IA3 learns its scaling vectors; it takes no scaling")


KIND = AdapterKind(
    name="ia3",
    sites={t: "output" for t in TARGETS},
    module=IA3Site,
    summary="learned vectors scaling keys, values and the FFN's inner activation",
    order=111,
    sized_by_site=True,
    prepare=_prepare,
    select=lambda config: tuple(config.targets or TARGETS),
)
