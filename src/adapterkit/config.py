"""AdapterConfig: one dataclass for every adapter kind; the kinds themselves live in ``kinds/``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .kinds import KINDS as _KIND_REGISTRY
from .kinds import AdapterKind, get_kind

# The registered kind names, built-in ones first (``kinds/`` adds one per module).
KINDS: tuple[str, ...] = tuple(_KIND_REGISTRY)
ACTIVATIONS = ("relu", "gelu", "silu", "swish", "tanh")


def is_finite_number(value: Any, *, positive: bool = False) -> bool:
    """An int or float (a bool is neither here) that is finite, and > 0 where ``positive``: what every
    numeric option read from a user or a file must be."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > 0 or not positive


@dataclass
class AdapterConfig:
    """How one task's adapter is shaped.

    Size it by ``bottleneck_size`` (r) or by ``reduction_factor`` (r = hidden_size // reduction_factor);
    when neither is given, ``reduction_factor=16``.

    Attributes:
        kind: a registered kind (``adapterkit.kinds``, one module each): ``"houlsby"`` (serial after
            attention and FFN, trains layer norms), ``"pfeiffer"`` (serial after the FFN only),
            ``"parallel"`` (fed by the FFN input, scaled, added to its output) or
            ``"serial_attention"`` (serial after attention only).
        activation: the bottleneck's nonlinearity: relu, gelu, silu (= swish) or tanh.
        dropout: dropout on the bottleneck's output while training.
        leave_out: layer indices that get no adapter (decoder layers of encoder-decoder models are
            numbered after the encoder's).
        scaling: multiplier on the bottleneck's output (default: the kind's; 1.0 serial, 4.0 parallel).
        train_layer_norms: train per-task layer-norm affines (default: the kind's; True for houlsby only).
        init_std: std of the truncated-normal init of both projections; biases start at zero, so the
            adapter starts close to the identity.
        alpha: LoRA's alpha: the update is scaled by alpha / r (alpha / sqrt(r) with ``rslora``);
            default r (scale 1). Only for ``lora``.
        targets: the projections a ``lora`` or ``ia3`` adapter acts on, by role: q, k, v, o (attention),
            up, gate, down (FFN) for LoRA (default q, v); k, v, ff (the FFN's inner activation) for
            IA3 (default all three).
        rslora: rank-stabilised LoRA (Kalajdzievski 2023): scale alpha / sqrt(r) instead of alpha / r.
        dora: DoRA (Liu et al. 2024, PEFT's ``use_dora``): the LoRA-updated weight's direction times
            a learned magnitude per output feature (starts at ``||W||``: still the identity). Only
            for ``lora``.
        prefix_projection: prefix tuning's reparameterisation (Li & Liang 2021, section 4.3; PEFT's
            ``prefix_projection``): while training, every layer's keys and values come out of one MLP
            (a (P, d) embedding, Linear-tanh-Linear); artifacts hold them folded into plain per-layer
            prefixes. Only for ``prefix``.
        prefix_hidden_size: that MLP's hidden width (PEFT's ``encoder_hidden_size``); default 512
            with ``prefix_projection``.

    For ``lora`` the rank r is ``bottleneck_size`` (default 8); ``dropout`` drops the LoRA input.
    """

    kind: str = "houlsby"
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    activation: str = "gelu"
    dropout: float = 0.0
    leave_out: list[int] = field(default_factory=list)
    scaling: float | None = None
    train_layer_norms: bool | None = None
    init_std: float = 1e-2
    alpha: float | None = None
    targets: list[str] | None = None
    rslora: bool = False
    dora: bool = False
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None

    def __post_init__(self) -> None:
        kind = get_kind(self.kind)
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.targets, tuple | set | frozenset):
            self.targets = list(self.targets)
        if self.dora is not False and self.kind != "lora":
            raise ValueError(f"dora is a LoRA option (kind 'lora'); kind {self.kind!r} does not take it")
        if (self.prefix_projection is not False or self.prefix_hidden_size is not None) and self.kind != "prefix":
            raise ValueError(f"prefix_projection and prefix_hidden_size are prefix-tuning options (kind 'prefix'); "
                             f"kind {self.kind!r} does not take them")
        if kind.prepare is not None:
            kind.prepare(self)
        elif self.alpha is not None or self.targets is not None or self.rslora:
            raise ValueError(f"alpha, targets and rslora are LoRA / IA3 options; kind {self.kind!r} takes none of them")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}")
        if self.activation == "swish":
            self.activation = "silu"
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError("give AdapterConfig either bottleneck_size or reduction_factor, not both")
        if self.bottleneck_size is None and self.reduction_factor is None:
            self.reduction_factor = 16
        if self.bottleneck_size is not None and (
            isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1
        ):
            raise ValueError(f"AdapterConfig.bottleneck_size must be a positive integer; got {self.bottleneck_size!r}")
        if self.reduction_factor is not None and (
            isinstance(self.reduction_factor, bool)
            or not isinstance(self.reduction_factor, int | float)
            or not self.reduction_factor > 0
        ):
            raise ValueError(f"AdapterConfig.reduction_factor must be a positive number; got {self.reduction_factor!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1); got {self.dropout!r}")
        if isinstance(self.leave_out, range | set | frozenset):
            self.leave_out = list(self.leave_out)
        if not isinstance(self.leave_out, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.leave_out
        ):
            raise ValueError(f"AdapterConfig.leave_out must be a list of layer indices >= 0; got {self.leave_out!r}")
        self.leave_out = sorted(set(self.leave_out))
        if self.scaling is None:
            self.scaling = kind.default_scaling
        if not is_finite_number(self.scaling, positive=True):
            raise ValueError(f"AdapterConfig.scaling must be a finite positive number; got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if self.train_layer_norms is None:
            self.train_layer_norms = kind.trains_layer_norms
        if not isinstance(self.train_layer_norms, bool):
            raise ValueError(f"AdapterConfig.train_layer_norms must be True, False or None; got {self.train_layer_norms!r}")
        if not isinstance(self.init_std, int | float) or not self.init_std > 0:
            raise ValueError(f"AdapterConfig.init_std must be a positive number; got {self.init_std!r}")
        if kind.check is not None:
            kind.check(self)

    @property
    def kind_spec(self) -> AdapterKind:
        """This config's kind from the registry (``adapterkit.kinds``)."""
        return get_kind(self.kind)

    @property
    def sites(self) -> tuple[str, ...]:
        """The positions this adapter acts at (``kinds.POSITIONS``), e.g. ("attn", "ffn")."""
        return tuple(get_kind(self.kind).positions(self))

    @property
    def parallel(self) -> bool:
        """Some module of this kind is fed by its sublayer's input rather than its output."""
        return "input" in get_kind(self.kind).sites.values()

    def bottleneck_for(self, hidden_size: int) -> int:
        """The bottleneck width r for a model of this hidden size."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden_size // self.reduction_factor))

    def to_dict(self) -> dict[str, Any]:
        """As a JSON-able dict. Options a kind does not use are left out when unset, so a bottleneck
        adapter's metadata is what it was before LoRA existed."""
        data = asdict(self)
        for key, unset in (("alpha", None), ("targets", None), ("rslora", False), ("dora", False),
                           ("prefix_projection", False), ("prefix_hidden_size", None)):
            if data[key] == unset:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a dict (e.g. an artifact's metadata); unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"adapter config must be a JSON object; got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown adapter config key(s): {', '.join(unknown)}")
        return cls(**data)
