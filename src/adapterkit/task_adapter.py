"""The modules one task adds to a base model: per-layer kind modules and norm affines, and a head.

State-dict names (the artifact's tensor names): ``layers.{i}.{position}.*`` for each position of the
kind (``attn``, ``ffn``), ``layers.{i}.norms.{j}.{scale,shift}``, ``head.*``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .kinds import SiteModule
from .stacks import bump_epoch


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
        bump_epoch(self)
        return super()._apply(fn, *args, **kwargs)


class LayerAdapter(nn.Module):
    """One task's modules in one transformer layer: one per position of its kind (registered under the
    position's name, so ``layer.attn`` / ``layer.ffn``), then ``norms``."""

    def __init__(
        self,
        hidden_size: int,
        config: AdapterConfig,
        num_norms: int,
        dims: dict[str, tuple[int, int]] | None = None,
        **factory: Any,
    ):
        super().__init__()
        kind = config.kind_spec
        for position in kind.positions(config):
            size = None if dims is None else dims.get(position)
            self.add_module(position, kind.build(position, hidden_size, config, dims=size, **factory))
        n = num_norms if config.train_layer_norms else 0
        self.norms = nn.ModuleList(NormAffine(hidden_size, **factory) for _ in range(n))

    def site(self, position: str) -> SiteModule | None:
        """This layer's module at ``position``, or None where the kind puts none."""
        module = self._modules.get(position)
        return module if isinstance(module, SiteModule) else None


class TaskAdapter(nn.Module):
    """Everything one task adds to the base model: per-layer kind modules and norm affines, and a head."""

    def __init__(
        self,
        config: AdapterConfig,
        hidden_size: int,
        norms_per_layer: list[int],
        head: nn.Module | None = None,
        task: dict[str, Any] | None = None,
        head_spec: dict[str, Any] | None = None,
        dims_per_layer: list[dict[str, tuple[int, int]]] | None = None,
        **factory: Any,
    ):
        super().__init__()
        self.config = config
        self.task = task or {"type": "none", "labels": []}
        self.head_spec = head_spec
        # dims_per_layer[i]: position -> (in, out) features of the projection there (kinds sized by site)
        self.layers = nn.ModuleList(
            None if i in config.leave_out
            else LayerAdapter(hidden_size, config, n, None if dims_per_layer is None else dims_per_layer[i], **factory)
            for i, n in enumerate(norms_per_layer)
        )
        self.head = head
        link = config.kind_spec.link
        if link is not None:  # modules that share parameters across layers (prefix tuning's MLP)
            link(self)

    def _lookup(self) -> dict[tuple, Any]:
        """(layer, position) -> SiteModule and (layer, norm index) -> NormAffine, as a plain dict:
        routing reads these per site per call, and nn.Module attribute lookups are slow."""
        table = self.__dict__.get("_table")
        if table is None:
            table = {}
            for i, la in enumerate(self.layers):
                if la is None:
                    continue
                for position, module in la._modules.items():
                    if isinstance(module, SiteModule):
                        table[(i, position)] = module
                for j, n in enumerate(la.norms):
                    table[(i, j)] = n
            self.__dict__["_table"] = table
        return table

    def site(self, layer: int, position: str) -> SiteModule | None:
        """This task's module at one position of one layer (None: none there)."""
        return self._lookup().get((layer, position))

    def norm(self, layer: int, index: int) -> NormAffine | None:
        return self._lookup().get((layer, index))
