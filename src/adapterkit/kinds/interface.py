"""What an adapter kind is: the positions it acts at, the module it puts there, and that module's maths.

A *position* is a place in one transformer layer where kinds act, resolved through the layer's
``LayerSites`` (``sites.py``). A forward hook hands the output of the position's ``output`` module to
the routed adapters, which return the new output (an output-add, or any per-row function of it). A kind
fed by the sublayer's *input* (parallel adapters) reads what a pre-hook captured from the position's
``input`` module in the same forward.

A *kind* (``AdapterKind``) names its positions, what feeds each (``"output"`` or ``"input"``), the
``SiteModule`` class it builds there, and its defaults. The ``SiteModule`` class carries the maths:
``apply_single`` (one adapter for the whole batch, its own parameters) and the classmethods
``mixed_plan`` / ``apply_mixed`` (per-row weights in a mixed batch). Rows of every kind whose modules
share a class go through one ``apply_mixed`` call, over the whole batch (rows of other classes at that
site see zero weights there) or, where other classes hold many rows, over a route of this class's rows
alone; one adapter's rows may instead go through its ``apply_single``. Routing (``routing.py``) knows
nothing else about kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..stacks import bump_epoch

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..routing import Route

FEEDS = ("output", "input")


@dataclass(frozen=True)
class Position:
    """A place in a transformer layer where a kind's module acts.

    ``output``: the ``LayerSites`` attribute (a module role, ``sites.py``) whose output a forward hook
    passes to the adapters — or, with ``acts_on="input"``, whose first input a forward pre-hook passes
    to them (IA3 scales the FFN's inner activation, the input of its output projection).
    ``input``: the ``LayerSites`` attribute whose first input a pre-hook captures for modules fed by
    the sublayer's input, or None where ``sites.py`` names no such module (no ``"input"`` feed there).
    ``acts_on="backbone"``: no hook on ``output``; forward pre-hooks (with kwargs) on the modules the
    module class names (classmethod ``backbone_hooks(base, layer_sites)``: (module, its layers, the
    function that rewrites its inputs) triples; by default, or when it returns None, one hook on the
    backbone through the classmethod ``apply_backbone``) hand those modules' keyword inputs over to be
    rewritten (prefix tuning: the decoder backbone's KV cache and mask, or each layer's self-attention
    inputs); ``output`` then only sizes the modules (``AdapterKind.sized_by_site``).
    Roles that a row of the site table may lack (``sites.PROJECTION_ROLES``) are hooked only where the
    layer has them, and only once some adapter has a module at the position.
    """

    output: str
    input: str | None = None
    acts_on: str = "output"


# The positions a kind may act at. Bottleneck kinds act at "attn" and "ffn"; LoRA at any projection
# (fed by the projection's own input, added to its output); IA3 scales the outputs of "k" and "v" and
# the input of the FFN's output projection ("ff").
POSITIONS: dict[str, Position] = {
    "attn": Position(output="attn_out"),  # after the attention output projection
    "ffn": Position(output="ffn_out", input="ffn_in"),  # after the FFN; its input feeds parallel kinds
    "q": Position(output="attn_q", input="attn_q"),
    "k": Position(output="attn_k", input="attn_k"),
    "v": Position(output="attn_v", input="attn_v"),
    "o": Position(output="attn_out", input="attn_out"),
    "up": Position(output="ffn_up", input="ffn_up"),
    "gate": Position(output="ffn_gate", input="ffn_gate"),
    "down": Position(output="ffn_out", input="ffn_out"),
    "ff": Position(output="ffn_out", acts_on="input"),  # the FFN's inner activation
    "prefix": Position(output="attn_v", acts_on="backbone"),  # the KV cache; sized by the value projection
}


class SiteModule(nn.Module):
    """One task's parameters at one position of one layer, and the maths that applies them.

    Subclasses set ``feed`` (per instance: one class may serve serial and parallel kinds), implement
    ``params`` (the tensors a mixed batch stacks, read live), ``apply_single`` and, for mixed batches,
    the classmethods ``mixed_plan`` and ``apply_mixed``.
    """

    feed: str = "output"

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> SiteModule:
        bump_epoch(self)  # .to() / .half() / .cuda(): stacked copies of these weights are stale
        return super()._apply(fn, *args, **kwargs)

    def apply_single(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """This adapter on every row: the hooked module's new output, from its output ``out`` and this
        module's feed ``z`` (``out`` itself, or the captured sublayer input); None leaves ``out``."""
        raise NotImplementedError

    @classmethod
    def mixed_plan(cls, members: list[SiteModule | None], slots: list[int]) -> Any | None:
        """What a mixed pass at one site needs besides weights, computed once per route and cached.

        ``members[k]``: adapter k's module here (None: absent, or of another class); ``slots[i]``:
        row i's adapter as 1 + k, or 0 for none. None: no row has a module of this class here.
        """
        raise NotImplementedError

    @classmethod
    def apply_mixed(
        cls, route: Route, layer: int, position: str, plan: Any, out: torch.Tensor, captured: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Each row through its own adapter's module: the new output of the hooked module.

        Rows whose module is of another class, or who have none, must come out exactly unchanged.
        ``route.gather`` gives row-aligned weights (from the model's stacks under inference);
        ``captured`` is the position's input (B, ..., d) when any module here is fed by it.
        """
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class AdapterKind:
    """One adapter kind: where it acts, what it builds there, and its defaults.

    Attributes:
        name: the ``AdapterConfig.kind`` value.
        sites: position -> feed (``"output"``: the sublayer's output; ``"input"``: its captured input),
            in the order the modules are built (and named in the state dict).
        module: the ``SiteModule`` class built at each position, as ``module(hidden_size, config,
            feed=..., **factory)``.
        default_scaling: ``AdapterConfig.scaling`` when not given.
        trains_layer_norms: ``AdapterConfig.train_layer_norms`` when not given.
        summary: one line for documentation and the command line.
        check: optional extra validation of an ``AdapterConfig`` of this kind (raise ValueError).
        order: sort key among kinds (the built-in ones first, in the order the README lists them).
        sized_by_site: the module is shaped by the projection it acts on (LoRA, IA3): ``build`` passes
            ``dims=(in_features, out_features)`` of that projection and the ``position``.
        prepare: optional: fill this kind's defaults into an ``AdapterConfig`` before it is validated
            (LoRA's rank and targets).
        select: optional: the positions (a subset of ``sites``) a given config uses; default all.
        link: optional: wire an adapter's modules across layers once all are built, called with the
            ``TaskAdapter`` (prefix tuning's reparameterisation MLP has one input stage for all layers).
        export: optional: an adapter's artifact form where it differs from its training form, as
            (tensors, config, extra metadata) (prefix tuning folds its MLP into plain prefixes);
            ``save_adapter`` writes it, except for resumable training checkpoints.
    """

    name: str
    sites: dict[str, str]
    module: type[SiteModule]
    default_scaling: float = 1.0
    trains_layer_norms: bool = False
    summary: str = ""
    check: Callable[[AdapterConfig], None] | None = None
    order: int = 100
    sized_by_site: bool = False
    prepare: Callable[[AdapterConfig], None] | None = None
    select: Callable[[AdapterConfig], tuple[str, ...]] | None = None
    link: Callable[[Any], None] | None = None
    export: Callable[[Any], tuple[dict[str, torch.Tensor], AdapterConfig, dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        for position, feed in self.sites.items():
            if position not in POSITIONS:
                raise ValueError(f"kind {self.name!r}: unknown position {position!r}; known: {', '.join(POSITIONS)}")
            if feed not in FEEDS:
                raise ValueError(f"kind {self.name!r}: feed of {position!r} must be one of {', '.join(FEEDS)}")
            if feed == "input" and POSITIONS[position].input is None:
                raise ValueError(f"kind {self.name!r}: position {position!r} has no input site to feed it")

    def positions(self, config: AdapterConfig) -> dict[str, str]:
        """The positions (-> feed) this config's modules go to, in build order."""
        if self.select is None:
            return dict(self.sites)
        chosen = set(self.select(config))
        return {p: f for p, f in self.sites.items() if p in chosen}

    def build(
        self, position: str, hidden_size: int, config: AdapterConfig, dims: tuple[int, int] | None = None, **factory: Any
    ) -> SiteModule:
        """The module this kind puts at ``position`` for one layer (``dims``: the targeted projection's
        (in, out) features, for kinds sized by their site)."""
        if self.sized_by_site:
            if dims is None:
                raise ValueError(f"kind {self.name!r} needs the dimensions of the projection at {position!r}")
            return self.module(hidden_size, config, feed=self.sites[position], dims=dims, position=position, **factory)
        return self.module(hidden_size, config, feed=self.sites[position], **factory)
