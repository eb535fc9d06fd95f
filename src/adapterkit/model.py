"""AdapterModel: a Hugging Face model with adapters attached, and its public API (a thin facade).

The base model's code is never edited or copied. adapterkit finds a few of its modules by name
(``sites.py``; ``site_check.py`` verifies them at attach time) and attaches to them (``attach.py``:
forward hooks at each position of ``kinds.POSITIONS`` an adapter uses, hooked on first use, and a thin
forward wrapper on each layer norm). With no adapter routed, every hook returns at once and the
base model's outputs are bit-identical. The rest lives beside it: what each kind computes
(``kinds/``), per-row routing (``routing.py``), weight stacks (``stacks.py``), task types and heads
(``tasks.py``, ``heads.py``), the artifact format and its checks (``artifact.py``).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .artifact import (
    ArtifactError,
    BaseModelMismatch,
    base_fingerprint,
    build_metadata,
    check_adapter_metadata,
    check_artifact_shapes,
    fingerprints_match,
    load_tensors_strict,
    read_artifact,
    stacked_on_of,
    write_artifact,
)
from .attach import Attachment
from .composition import (
    Average,
    Block,
    ChunkedRoute,
    CompositeRoute,
    Fuse,
    Parallel,
    SplitAbove,
    Stack,
    check_entry,
    lowest_adapted_layer,
    repeat_rows,
)
from .config import AdapterConfig
from .fusion import (
    MAX_MEMBERS,
    AdapterFusion,
    build_fusion_metadata,
    check_fusion_file,
    check_member,
    member_digest,
    read_fusion_tensors,
    site_keys,
    write_fusion,
)
from .heads import head_loss
from .kinds import POSITIONS, get_kind
from .routing import NO_ADAPTERS, NoAdapters, Route, apply_heads, current_route, routed, rows_with_heads
from .site_check import verify_sites, warn_if_no_norms
from .sites import (
    LayerSites,
    SiteSpec,
    UnknownArchitecture,
    backbone,
    describe_sites,
    find_layers,
    guess_sites,
    probe_weight,
    sites_for,
)
from .stacks import StackStore
from .task_adapter import TaskAdapter
from .tasks import HEAD_TYPES, HEADLESS_TYPES, TASKS, headless_task

# One name (or block) for the whole batch, one entry per row (None: no adapter), or None (the active one).
AdapterNames = str | Block | Sequence[str | Block | None] | None
_NAME_FORBIDDEN = set("/\\\x00")


@dataclass
class AdapterOutput(ModelOutput):
    """Output of a forward pass through task heads.

    ``logits``: (B, L) for sequence classification or (B, T, L) for token classification, where L is
    the largest label count among the rows' tasks; a row's labels beyond its own task's count are -inf.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    base_total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.base_total)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} of {self.base_total:,} base params ({self.percent:.2f} %)"


@dataclass
class _Merged:
    """What ``merge_adapter`` changed, to undo it: the adapter, each changed weight with its original,
    the base's fingerprint before the merge, and the active adapter it replaced."""

    name: str
    originals: list[tuple[torch.Tensor, torch.Tensor]]
    fingerprint: dict[str, Any]
    active: Route | None
    active_entry: str | Block | None


class _AdapterDict(nn.ModuleDict):
    """A ModuleDict whose keys may also be names of nn.Module attributes ("half", "train", "to"...):
    adapter names are user data, and ``add_module`` refuses those. Item access is all we use."""

    def __setitem__(self, key: str, module: nn.Module) -> None:
        self._modules[key] = module


class AdapterModel(nn.Module):
    """A transformers model plus any number of task adapters, routed per row.

    Args:
        base: any transformers model of a supported architecture, as loaded (``AutoModel``,
            ``AutoModelForCausalLM``, ``AutoModelForSeq2SeqLM``, ``...ForSequenceClassification``...).
            Its parameters are frozen by ``train_adapter``; its code is not touched.
        sites: a ``SiteSpec`` for an architecture the table lacks, or ``"guess"`` to try the known
            rows' module names on it; default: the table row of ``base.config.model_type``.
        verify: run one dry forward pass that checks every site's layout (``site_check.py``); turn it
            off only for models whose inputs adapterkit cannot make up or whose weights are not loaded.
    """

    def __init__(self, base: nn.Module, sites: SiteSpec | str | None = None, verify: bool = True):
        super().__init__()
        self.base = base
        if isinstance(sites, SiteSpec):
            self.sites = sites
        elif sites == "guess":
            self.sites = guess_sites(base)
        elif sites is None:
            self.sites = sites_for(base.config.model_type)
        else:
            raise ValueError(f"sites must be a SiteSpec, 'guess' or None; got {sites!r}")
        self.layer_sites = find_layers(base, self.sites)
        self.hidden_size = _hidden_size(base.config)
        if verify:
            verify_sites(base, self.sites, self.layer_sites, self.hidden_size)
        self.adapters = _AdapterDict()
        self.fusions = _AdapterDict()  # AdapterFusion layers by name (add_fusion); Fuse(..., fusion=name)
        self._active: Route | None = None
        self._active_entry: str | Block | None = None  # what set_active_adapter was given
        self._stacks = StackStore()  # mixed batches' per-site weight stacks, kept across calls
        self._merged: _Merged | None = None  # merge_adapter
        self._attachment = Attachment(self, self.layer_sites)  # hooks and norm wrappers on the base
        self._attachment.attach()
        self.train(base.training)  # follow the base: from_pretrained models come in eval mode

    # -- attaching (attach.py) -------------------------------------------------------------------

    def _attach_hooks(self, positions: Sequence[str]) -> None:
        """Hook ``positions`` on every layer that has their modules (when an adapter first needs them)."""
        self._attachment.hook(positions)

    def detach(self) -> nn.Module:
        """Remove every hook and wrapper and return the base model, exactly as it was; while an adapter
        is merged, with that adapter folded into its weights (PEFT's ``merge_and_unload``)."""
        self._attachment.detach()
        return self.base

    def __deepcopy__(self, memo: dict) -> AdapterModel:
        """A copy with its own hooks and wrappers, routing by itself; the original is not touched."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        clone._attachment.rebind_copy(clone, clone.base, clone.layer_sites)
        return clone

    def _route(self) -> Route | None:
        route = current_route(self)
        if isinstance(route, NoAdapters):
            return None
        return route if route is not None else self._active

    # -- managing adapters ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layer_sites)

    def sites_report(self) -> str:
        """Where adapters attach: how the sites were chosen, and each layer's modules and norms."""
        return describe_sites(self.base.config.model_type, self.sites, self.layer_sites)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or name.strip() != name or any(c in _NAME_FORBIDDEN for c in name):
            raise ValueError(f"adapter name must be a non-empty string without '/', '\\' or surrounding spaces; got {name!r}")
        if "." in name:
            raise ValueError(f"adapter name {name!r} may not contain '.' (it is a module name)")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")

    def _factory(self, dtype: torch.dtype | None) -> dict[str, Any]:
        ref = self.layer_sites[0].ffn_out
        p = next(ref.parameters())
        return {"device": p.device, "dtype": dtype or p.dtype}

    def _build(
        self,
        config: AdapterConfig,
        task_type: str,
        labels: list[str],
        head_dropout: float,
        dtype: torch.dtype | None,
    ) -> TaskAdapter:
        bad = [i for i in config.leave_out if i >= self.num_layers]
        if bad:
            raise ValueError(f"leave_out has layer indices {bad}, but this model has {self.num_layers} layers (0..{self.num_layers - 1})")
        if config.dora and self._merged is not None:  # its magnitude starts at ||W||: the base's W
            raise ValueError(f"a DoRA adapter reads the base weights, which hold merged adapter "
                             f"{self._merged.name!r}; unmerge_adapter({self._merged.name!r}) first")
        factory = self._factory(dtype)
        head, head_spec = self._new_head(task_type, labels, head_dropout, factory)
        positions = config.sites
        adapter = TaskAdapter(
            config,
            self.hidden_size,
            [len(ls.norms) for ls in self.layer_sites],
            head=head,
            task={"type": task_type, "labels": list(labels)},
            head_spec=head_spec,
            dims_per_layer=self._site_dims(config.kind, positions) if config.kind_spec.sized_by_site else None,
            **factory,
        )
        for (layer, position), module in adapter._lookup().items():
            bind = getattr(module, "bind_projection", None)  # DoRA reads the projection's weight
            if bind is not None and isinstance(position, str):
                ls, role = self.layer_sites[layer], POSITIONS[position].output
                bind(getattr(ls, role), ls.parts.get(role))
        self._attach_hooks(positions)
        return adapter

    def _new_head(self, task_type: str, labels: list[str], head_dropout: float,
                  factory: dict[str, Any]) -> tuple[nn.Module | None, dict[str, Any] | None]:
        """A task type's head and its JSON spec (None, None for a task without a head of its own)."""
        task = TASKS.get(task_type) if isinstance(task_type, str) else None
        if task is None:
            raise ValueError(f"unknown head {task_type!r}; expected one of {', '.join(HEAD_TYPES + HEADLESS_TYPES)} or None")
        if task.head is None:
            return None, None
        if not labels:
            raise ValueError(f"a {task_type} task needs its label names (labels=[...])")
        if len(set(labels)) != len(labels):
            raise ValueError(f"label names must be distinct; got {labels}")
        head_spec = {"type": task_type, "num_labels": len(labels), "dropout": head_dropout}
        return task.build_head(head_spec, self.hidden_size, self.sites.pooling).to(**factory), head_spec

    def _all_site_dims(self) -> list[dict[str, tuple[int, int]]]:
        """Per layer: every position this architecture has -> (in, out) of its projection."""
        out = []
        for ls in self.layer_sites:
            per_layer = {}
            for position, where in POSITIONS.items():
                try:
                    size = ls.dims(where.output)
                except UnknownArchitecture:  # not a linear projection (a custom SiteSpec): no sized kinds there
                    size = None
                if size is not None:
                    per_layer[position] = size
            out.append(per_layer)
        return out

    def _site_dims(self, kind: str, positions: Sequence[str]) -> list[dict[str, tuple[int, int]]]:
        """Per layer: position -> (in, out) features of the projection there; a clear error, naming the
        targets this architecture does take, where its row of the site table names no module for a
        targeted position, or names one that is no single projection (a mixture of experts' block)."""
        dims = []
        for ls in self.layer_sites:
            per_layer = {}
            for position in positions:
                role = POSITIONS[position].output
                try:
                    size = ls.dims(role)
                except UnknownArchitecture:  # a module that is no linear projection
                    raise self._no_projection(kind, position, ls, named=True) from None
                if size is None:
                    raise self._no_projection(kind, position, ls, named=False)
                per_layer[position] = size
            dims.append(per_layer)
        return dims

    def _no_projection(self, kind: str, position: str, ls: LayerSites, named: bool) -> ValueError:
        """The error for a target without a projection on this architecture: the row names none for its
        role, or (``named``) names a module that is not one; with the targets the layer does take."""
        role = POSITIONS[position].output
        model_type = self.base.config.model_type
        # a row whose FFN output is its FFN input module: one mixture-of-experts block, no projections
        moe = (f" (its FFN is one mixture-of-experts block, {type(ls.ffn_out).__name__}: each token goes through "
               f"its own experts' projections, none of them the FFN's)" if role.startswith("ffn") and ls.ffn_out is ls.ffn_in else "")
        here = []
        for other in get_kind(kind).sites:
            try:
                if ls.dims(POSITIONS[other].output) is not None:
                    here.append(other)
            except UnknownArchitecture:
                pass
        takes = f"this architecture takes {kind} targets {', '.join(here)}" if here else f"it takes no {kind} targets"
        if named:
            return ValueError(f"{kind} target {position!r} acts on the {role} module of {model_type!r} (layer {ls.path}: "
                              f"{ls.names.get(role)}), which is not one linear projection{moe}; {takes}")
        return ValueError(f"{kind} target {position!r} needs the {role} projection, which the site table row for "
                          f"{model_type!r} does not name (layer {ls.path}){moe}; {takes}")

    def add_adapter(
        self,
        name: str,
        config: AdapterConfig | None = None,
        *,
        head: str | None = None,
        labels: Sequence[str] = (),
        head_dropout: float = 0.1,
        dtype: torch.dtype | None = None,
    ) -> TaskAdapter:
        """Add a new, freshly initialised adapter (near identity) and, optionally, a task head.

        Args:
            head: ``"classification"``, ``"pair_classification"``, ``"token_classification"`` or None
                (the base model's own outputs: its LM head for causal / seq2seq LMs).
            labels: the task's label names, in logit order (required with a head).
            dtype: parameter dtype (default: the base model's). Pass torch.float32 to train adapters
                in full precision on a bf16/fp16 base.
        """
        self._check_new_name(name)
        task_type = head or headless_task(self.base)
        adapter = self._build(config or AdapterConfig(), task_type, list(labels), head_dropout, dtype)
        warn_if_no_norms(self.layer_sites, adapter.config.train_layer_norms, adapter.config.kind)
        adapter.train(self.training)
        self.adapters[name] = adapter
        return adapter

    def average_adapter(self, name: str, members: Sequence[str], weights: Sequence[float] | None = None,
                        normalize: bool = True) -> TaskAdapter:
        """A new adapter ``name`` whose every parameter is the weighted average of ``members``' (weight-
        space averaging; for the output average at every site, route ``Average(...)`` instead).

        The members must share one config (kind, sizes, targets, ``leave_out``) and one task (type and
        labels; their heads are averaged too). ``weights``: default equal; normalised to sum 1 unless
        ``normalize=False``.
        """
        self._check_new_name(name)
        block = Average(*members, weights=weights, normalize=normalize)
        if len(block.members) < 2 or not all(isinstance(m, str) for m in block.members):
            raise ValueError("average_adapter takes two or more adapter names")
        sources = [self._get(m) for m in block.members]
        first = sources[0]
        for m, a in zip(block.members[1:], sources[1:]):
            if a.config.to_dict() != first.config.to_dict():
                raise ValueError(f"cannot average {block.members[0]!r} and {m!r}: their configs differ "
                                 f"({first.config.to_dict()} vs {a.config.to_dict()})")
            if a.task != first.task or a.head_spec != first.head_spec:
                raise ValueError(f"cannot average {block.members[0]!r} and {m!r}: their tasks differ "
                                 f"({first.task} vs {a.task})")
        dtype = next(first.parameters()).dtype
        task_type = first.task["type"]
        head = task_type if TASKS[task_type].head is not None else None
        dropout = float((first.head_spec or {}).get("dropout", 0.1))
        adapter = self.add_adapter(name, AdapterConfig.from_dict(first.config.to_dict()), head=head,
                                   labels=first.task["labels"], head_dropout=dropout, dtype=dtype)
        states = [a.state_dict() for a in sources]
        with torch.no_grad():
            averaged = {k: sum(w * st[k].to(torch.float32) for w, st in zip(block.weights, states)).to(v.dtype)
                        for k, v in states[0].items()}
        adapter.load_state_dict(averaged)
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter (and its head). The active default is cleared if it used it."""
        self._get(name)
        if self._merged is not None and self._merged.name == name:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge_adapter({name!r}) first")
        adapter = self.adapters[name]
        if self._active is not None and any(a is adapter for a in self._active.adapters):
            self._active, self._active_entry = None, None
        self._stacks.forget(list(adapter._lookup().values()))
        del self.adapters[name]

    def list_adapters(self) -> list[str]:
        return list(self.adapters.keys())

    def adapter_info(self, name: str) -> dict[str, Any]:
        """Name, config, task, parameter count, and ``stacked_on``: the adapters (name, sha256, kind;
        bottom first) it was trained on top of, which it expects under it (``check_stacked_on``)."""
        a = self._get(name)
        return {"name": name, "config": a.config.to_dict(), "task": dict(a.task), "parameters": _count(a),
                "stacked_on": [dict(e) for e in getattr(a, "stacked_on", [])]}

    def labels(self, name: str) -> list[str]:
        return list(self._get(name).task["labels"])

    def _get(self, name: str) -> TaskAdapter:
        if not isinstance(name, str) or name not in self.adapters:
            known = ", ".join(self.adapters.keys()) or "none"
            raise KeyError(f"unknown adapter {name!r}; loaded adapters: {known}")
        return self.adapters[name]

    def set_active_adapter(self, name: str | Block | None) -> None:
        """The adapter (or composition: ``Stack("domain", "ner")``) every forward uses when the call
        names none (None: no adapter)."""
        if isinstance(name, Parallel):
            raise ValueError("Parallel gives several outputs per input: pass it to forward_parallel, not as the active adapter")
        if not isinstance(name, Block):
            self._check_merged([name])
        route = None if name is None else self._make_route(name)
        self._active, self._active_entry = route, name

    # -- merging (single-task deployment) ------------------------------------------------------

    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into the base model's weights (LoRA: ``W += s B A``; IA3: rows and
        columns scaled), for single-task serving at the bare model's speed.

        The original weights are kept (a copy of each merged projection), so ``unmerge_adapter``
        restores them bit for bit. While merged, every call runs that adapter (its head too); routing
        to any other adapter, or to none, raises — the base weights are not the base model's.
        Kinds without a weight form (bottlenecks) cannot be merged.
        """
        adapter = self._get(name)
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged.name!r} is already merged; unmerge_adapter it first")
        sites = [(key, m) for key, m in adapter._lookup().items() if isinstance(key[1], str)]
        if not all(hasattr(m, "merge_into") for _, m in sites):
            raise ValueError(f"adapter {name!r} is of kind {adapter.config.kind!r}, which has no weight form to merge")
        fingerprint = self.fingerprint()  # of the base as it is, before its weights change
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for (layer, position), module in sites:
                ls = self.layer_sites[layer]
                role = POSITIONS[position].output
                target = getattr(ls, role)
                weight, bias = target.weight, getattr(target, "bias", None)
                for p in (weight, bias):
                    if p is not None and id(p) not in saved:
                        saved[id(p)] = (p, p.detach().clone())
                w = weight if isinstance(target, nn.Linear) else weight.t()  # Conv1D keeps (in, out)
                part = ls.parts.get(role)
                if part is None:
                    module.merge_into(w, bias)
                else:  # its rows of a fused projection (a copy where they interleave): merged, put back
                    w_part, b_part = part.take(w, 0), None if bias is None else part.take(bias, 0)
                    module.merge_into(w_part, b_part)
                    part.put(w, w_part, 0)
                    if bias is not None:
                        part.put(bias, b_part, 0)
                module.merged = True
        self._merged = _Merged(name, list(saved.values()), fingerprint, self._active, self._active_entry)
        self._active, self._active_entry = Route.for_rows([adapter]), name

    def unmerge_adapter(self, name: str) -> None:
        """Undo ``merge_adapter``: the base weights are restored bit for bit from the kept copies, and
        the active adapter is again what it was before the merge."""
        merged = self._merged
        if merged is None or merged.name != name:
            raise ValueError(f"adapter {name!r} is not merged")
        with torch.no_grad():
            for p, original in merged.originals:
                p.copy_(original)
        for key, module in self._get(name)._lookup().items():
            if isinstance(key[1], str):
                module.merged = False
        self._merged = None
        self._active, self._active_entry = merged.active, merged.active_entry

    @property
    def merged_adapter(self) -> str | None:
        """The adapter merged into the base weights, if any."""
        return None if self._merged is None else self._merged.name

    def _check_merged(self, names: Sequence[str | None]) -> None:
        if self._merged is not None and any(n != self._merged.name for n in names):
            merged = self._merged.name
            raise ValueError(
                f"adapter {merged!r} is merged into the base weights: every row runs it; "
                f"unmerge_adapter({merged!r}) to route rows to {sorted({str(n) for n in names})}"
            )

    @property
    def active_adapter(self) -> str | Block | None:
        return None if self._active is None else self._active_entry

    # -- training ------------------------------------------------------------------------------

    def train_adapter(self, name: str) -> ParameterReport:
        """Freeze everything, then unfreeze exactly adapter ``name``: its bottlenecks, its norm affines
        (when its config trains layer norms) and its head. Makes it the active adapter."""
        return self._train_only(self._get(name), name)

    def train_full(self, name: str) -> ParameterReport:
        """Full fine-tuning, for honest comparisons: every base parameter trains, plus task ``name``
        (give it ``AdapterConfig(leave_out=range(model.num_layers))`` for a head-only task)."""
        self.train_adapter(name)
        for p in self.base.parameters():
            p.requires_grad_(True)
        return self.trainable_parameters()

    def trainable_parameters(self) -> ParameterReport:
        """How many parameters train, against the base model's size."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return ParameterReport(trainable, _count(self.base))

    # -- AdapterFusion (fusion.py) -------------------------------------------------------------

    def add_fusion(
        self,
        name: str,
        members: Sequence[str],
        *,
        head: str | None = None,
        labels: Sequence[str] = (),
        head_dropout: float = 0.1,
        temperature: float = 1.0,
        dtype: torch.dtype | None = None,
    ) -> AdapterFusion:
        """A new AdapterFusion ``name`` over ``members`` (adapter names): one fusion layer at every site
        where a member acts, initialised so that it starts as the members' average, and, optionally,
        its own task head (``head``, ``labels`` as in ``add_adapter``), which answers for rows routed to
        ``Fuse(*members, fusion=name)``. Members must not train layer-norm affines."""
        self._check_new_fusion_name(name)
        names, adapters = self._fusion_members(members)
        task_type = head or headless_task(self.base)
        fusion = self._new_fusion(names, adapters, task_type, list(labels), head_dropout, temperature,
                                  self._factory(dtype))
        fusion.train(self.training)
        self.fusions[name] = fusion
        return fusion

    def train_fusion(self, name: str) -> ParameterReport:
        """Freeze everything, then unfreeze exactly fusion ``name`` (its layers and head): its members
        stay frozen. Makes ``Fuse(*members, fusion=name)`` the active route."""
        fusion = self._get_fusion(name)
        block = Fuse(*fusion.members, fusion=name)
        check_entry(block, self._get, self._get_fusion)  # its members are still loaded, as they were
        return self._train_only(fusion, block)

    def _train_only(self, module: nn.Module, route: str | Block) -> ParameterReport:
        """Freeze everything but ``module``'s parameters; ``route`` becomes the active adapter."""
        if self._merged is not None:  # a merged adapter's own tensors are out of the forward pass
            raise ValueError(f"adapter {self._merged.name!r} is merged into the base weights; "
                             f"unmerge_adapter({self._merged.name!r}) before training")
        for p in self.parameters():
            p.requires_grad_(False)
        for p in module.parameters():
            p.requires_grad_(True)
        self.set_active_adapter(route)
        return self.trainable_parameters()

    def delete_fusion(self, name: str) -> None:
        """Remove a fusion (its members stay). The active default is cleared if it used it."""
        fusion = self._get_fusion(name)
        if any(f is fusion for f in getattr(self._active, "fusions", {}).values()):
            self._active, self._active_entry = None, None
        del self.fusions[name]

    def list_fusions(self) -> list[str]:
        return list(self.fusions.keys())

    def save_fusion(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        metrics: dict[str, float] | None = None,
        description: str = "",
    ) -> Path:
        """Write fusion ``name`` (its layers and head) to one ``.safetensors`` file, atomically, with
        metadata naming each member and its sha256, and the base fingerprint."""
        fusion = self._get_fusion(name)
        fusion.check_members(self._get)
        members = {m: self._get(m) for m in fusion.members}
        metadata = build_fusion_metadata(name, fusion, members, self.fingerprint(), metrics, description)
        return write_fusion(path, fusion, metadata)

    def load_fusion(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        *,
        check_base: bool = True,
        dtype: torch.dtype | None = None,
    ) -> str:
        """Load a fusion saved by ``save_fusion`` as fusion ``name`` (default: the saved name). Its
        members must be loaded already, with the very tensors it was trained with (sha256).

        Everything is checked from the file's header before anything is allocated (base fingerprint,
        members, the exact tensor names and shapes the members imply); a bad file raises ArtifactError
        (BaseModelMismatch for another base) and leaves the model as it was."""
        where = str(path)
        doc = check_fusion_file(path, self._get, self.fingerprint() if check_base else None, self._fusion_shapes)
        name = name or doc["name"]
        self._check_new_fusion_name(name)
        names, adapters = self._fusion_members([m["name"] for m in doc["members"]])
        tensors = read_fusion_tensors(path)
        try:
            fusion = self._new_fusion(names, adapters, doc["task"]["type"], list(doc["task"].get("labels", [])),
                                      _head_dropout(doc), doc["temperature"], self._factory(dtype))
        except ValueError as e:
            raise ArtifactError(f"{where}: {e}") from None
        load_tensors_strict(fusion, tensors, where)
        fusion.train(self.training)
        self.fusions[name] = fusion
        return name

    def _get_fusion(self, name: str) -> AdapterFusion:
        if not isinstance(name, str) or name not in self.fusions:
            known = ", ".join(self.fusions.keys()) or "none"
            raise KeyError(f"unknown fusion {name!r}; loaded fusions: {known}")
        return self.fusions[name]

    def _check_new_fusion_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or name.strip() != name or any(c in _NAME_FORBIDDEN for c in name) or "." in name:
            raise ValueError(f"fusion name must be a non-empty string without '/', '\\', '.' or surrounding spaces; got {name!r}")
        if name in self.fusions:
            raise ValueError(f"a fusion named {name!r} is already loaded; delete_fusion it first or pick another name")

    def _fusion_members(self, members: Sequence[str]) -> tuple[list[str], list[TaskAdapter]]:
        if isinstance(members, str) or not isinstance(members, Sequence) or not all(isinstance(m, str) for m in members):
            raise TypeError(f"a fusion's members are a list of adapter names; got {members!r}")
        names = list(members)
        if not 2 <= len(names) <= MAX_MEMBERS:
            raise ValueError(f"a fusion needs 2 to {MAX_MEMBERS} members; got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a fusion names an adapter more than once: {names}")
        adapters = [self._get(n) for n in names]
        for n, a in zip(names, adapters):
            check_member(n, a)
        return names, adapters

    def _fusion_sites(self, names: list[str], adapters: list[TaskAdapter]) -> dict[tuple[int, str], int]:
        """(layer, position) -> width of the tensor there, for every site where a member acts."""
        sites = {}
        for name, adapter in zip(names, adapters):
            for layer, position in site_keys(adapter):
                where = POSITIONS[position]
                if where.acts_on == "backbone":
                    raise ValueError(f"adapter {name!r} ({adapter.config.kind}) acts on the backbone's KV cache, not on "
                                     "a site's output: a fusion cannot combine it")
                try:
                    dims = self.layer_sites[layer].dims(where.output)
                except UnknownArchitecture:  # a custom SiteSpec's non-linear module: a bottleneck's output
                    dims = None
                if where.acts_on == "input":  # the projection's input (IA3 on the FFN's activation)
                    if dims is None:
                        raise ValueError(f"cannot size a fusion layer at {position!r} of layer {layer}")
                    sites[(layer, position)] = dims[0]
                else:
                    sites[(layer, position)] = self.hidden_size if dims is None else dims[1]
        return sites

    def _new_fusion(self, names: list[str], adapters: list[TaskAdapter], task_type: str, labels: list[str],
                    head_dropout: float, temperature: float, factory: dict[str, Any]) -> AdapterFusion:
        head, head_spec = self._new_head(task_type, labels, head_dropout, factory)
        return AdapterFusion(
            names, self._fusion_sites(names, adapters), self.num_layers,
            member_sites={n: frozenset(site_keys(a)) for n, a in zip(names, adapters)},
            temperature=temperature, head=head, task={"type": task_type, "labels": list(labels)},
            head_spec=head_spec, **factory,
        )

    def _fusion_shapes(self, doc: dict[str, Any], adapters: list[TaskAdapter]) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of the fusion ``doc`` describes over these loaded members: the real
        modules, built on the meta device (no memory for weights)."""
        names = [m["name"] for m in doc["members"]]
        with torch.device("meta"):
            fusion = self._new_fusion(names, adapters, doc["task"]["type"], list(doc["task"].get("labels", [])),
                                      _head_dropout(doc), doc["temperature"], {"device": torch.device("meta")})
        return {k: tuple(v.shape) for k, v in fusion.state_dict().items()}

    # -- routing -------------------------------------------------------------------------------

    def _make_route(self, names: AdapterNames, repeats_rows: bool = False) -> Route | NoAdapters | None:
        if names is None:
            return None  # the active default
        if isinstance(names, str):
            self._check_merged([names])
            return Route.for_rows([self._get(names)])
        if isinstance(names, Block):  # one composition for the whole batch: one row, repeated
            check_entry(names, self._get, self._get_fusion)
            self._check_merged(names.leaves())
            return CompositeRoute.for_entries([names], self._get, self._stacks, repeats_rows=True,
                                              fusions=self._get_fusion)
        if isinstance(names, torch.Tensor) or not isinstance(names, Sequence):
            raise TypeError(f"adapter_names must be a name, a list of names (None for no adapter) or None; got {type(names).__name__}")
        if not names:
            raise ValueError("adapter_names is empty")
        if any(isinstance(n, Block) for n in names):
            for n in names:
                check_entry(n, self._get, self._get_fusion)
            self._check_merged([leaf for n in names for leaf in (n.leaves() if isinstance(n, Block) else [n])])
            return CompositeRoute.for_entries(names, self._get, self._stacks, repeats_rows=repeats_rows,
                                              fusions=self._get_fusion)
        rows = [None if n is None else self._get(n) for n in names]
        self._check_merged(names)
        route = Route.for_rows(rows, self._stacks)
        if route is None:
            return NO_ADAPTERS
        route.repeats_rows = repeats_rows
        return route

    @contextmanager
    def route(self, names: AdapterNames, drop_below: int = 0) -> Iterator[None]:
        """Within the block, forward passes of this model (and of ``self.base``) use ``names``: one name
        or composition for the whole batch, or one per row (None: no adapter for that row); None: the
        active adapter.

        ``drop_below``: AdapterDrop — layers ``0 .. drop_below - 1`` run without adapters (norm affines
        included). In training, nothing below the lowest adapted layer then needs gradients, so the
        backward stops there; sample it per step for the paper's stochastic AdapterDrop.

        The route belongs to this thread or asyncio task (a thread started inside the block, such as a
        streaming ``generate``, starts with none) and to this model alone.
        """
        if isinstance(drop_below, bool) or not isinstance(drop_below, int) or not 0 <= drop_below <= self.num_layers:
            raise ValueError(f"drop_below must be a layer count in 0..{self.num_layers}; got {drop_below!r}")
        if names is None and drop_below and self._active is not None:
            names = self._active_entry  # a fresh route of the active one: the shared one stays as it is
        route = self._make_route(names)
        if drop_below and isinstance(route, Route):
            route.drop_below = drop_below
        if route is None:
            yield
            return
        with routed(self, route):
            yield

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: AdapterNames = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with adapters routed per row.

        When the rows' tasks have heads, returns AdapterOutput (loss when ``labels`` are given);
        otherwise the base model's own output (an LM's logits and loss, a bare encoder's hidden states).
        """
        inputs = {k: v for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids)) if v is not None}
        kwargs.pop("num_items_in_batch", None)  # Trainer's loss normaliser: our loss is a per-batch mean
        inputs.update(kwargs)
        batch = _batch_size(inputs)
        if isinstance(adapter_names, Parallel):
            return self._forward_parallel(adapter_names, inputs, labels, batch)
        route = self._make_route(adapter_names)
        if isinstance(adapter_names, Sequence) and not isinstance(adapter_names, str) and batch is not None and len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows")
        with routed(self, route) if route is not None else nullcontext():
            effective = self._route()
            names = rows_with_heads(effective, batch)
            if names is None:  # no task head in play: the base model's own forward, labels and all
                if labels is not None:
                    inputs["labels"] = labels
                return self.base(**inputs)
            hidden = backbone(self.base)(**inputs).last_hidden_state  # (B, T, d)
            logits = apply_heads(names, hidden, attention_mask)
        loss = head_loss(logits, labels) if labels is not None else None
        return AdapterOutput(loss=loss, logits=logits, last_hidden_state=hidden)

    def _forward_parallel(self, block: Parallel, inputs: dict[str, Any], labels: torch.Tensor | None,
                          batch: int | None) -> Any:
        """``forward(adapter_names=Parallel(m1, ..., mN))``: N outputs for one input batch of B rows,
        member-major (N·B rows: member 1's B rows first). The layers below the members' lowest adapted
        layer run once; the batch is repeated where it enters that layer (composition.SplitAbove)."""
        members = block.members
        if len(members) < 2:
            raise ValueError(f"Parallel needs at least two members; got {len(members)}")
        for m in members:
            check_entry(m, self._get, self._get_fusion)
        if batch is None:
            raise ValueError("Parallel needs batched inputs (input_ids or inputs_embeds)")
        if getattr(self.base.config, "is_encoder_decoder", False):
            raise ValueError("Parallel is not supported on encoder-decoder models; run the members as rows instead")
        n = len(members)
        leaves = [self._get(name) for m in members if m is not None for name in (m.leaves() if isinstance(m, Block) else [m])]
        split = lowest_adapted_layer(leaves)
        if "use_cache" in inspect.signature(self.base.forward).parameters:
            inputs.setdefault("use_cache", False)  # a cache of layers with two batch sizes helps no one
        if split is None or split == 0:
            inputs = {k: repeat_rows(v, batch, n) for k, v in inputs.items()}
            splitter = nullcontext()
        else:
            layers = [self.base.get_submodule(ls.path) for ls in self.layer_sites[split:]]
            splitter = SplitAbove(layers, batch, n)
        if labels is not None:
            labels = repeat_rows(labels if labels.dim() > 1 else labels[:, None], batch, n).reshape(-1, *labels.shape[1:])
        mask = inputs.get("attention_mask")
        # one route per member over its own contiguous chunk of B rows (single adapters: the fast path)
        parts = [self._make_route([m] * batch) for m in members]
        parts = [None if isinstance(r, NoAdapters) or r is None else r for r in parts]
        heads = [a for r in parts for a in (r.rows if r is not None else [None] * batch)]
        route = ChunkedRoute(heads, store=self._stacks, parts=parts)
        with splitter, routed(self, route):
            effective = self._route()
            names = rows_with_heads(effective, batch * n)
            if names is None:
                if labels is not None:
                    inputs["labels"] = labels
                return self.base(**inputs)
            hidden = backbone(self.base)(**inputs).last_hidden_state  # (N·B, T, d)
            logits = apply_heads(names, hidden, None if mask is None else repeat_rows(mask, batch, n))
        loss = head_loss(logits, labels) if labels is not None else None
        return AdapterOutput(loss=loss, logits=logits, last_hidden_state=hidden)

    @torch.no_grad()
    def generate(self, *args: Any, adapter_names: AdapterNames = None, **kwargs: Any) -> Any:
        """``base.generate`` with adapters routed per row (rows repeated for beams follow their row)."""
        if isinstance(adapter_names, Parallel):
            raise ValueError("generate takes no Parallel block: pass one name or composition per row")
        route = self._make_route(adapter_names, repeats_rows=True)
        if isinstance(adapter_names, Sequence) and not isinstance(adapter_names, str):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            batch = _batch_size({"input_ids": first, **kwargs})
            if batch is not None and len(adapter_names) != batch:
                raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows")
        with routed(self, route) if route is not None else nullcontext():
            return self.base.generate(*args, **kwargs)

    # -- HF conveniences (Trainer and friends look for these) ----------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """The base model's gradient checkpointing, with each call's route carried into the recomputation
        (which runs during backward, outside the call's routing context)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:
            self.base.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        self._attachment.wrap_checkpointing(self.base)

    def gradient_checkpointing_disable(self) -> None:
        self.base.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base, "is_gradient_checkpointing", False))

    # forward() computes its own mean loss; Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    @property
    def config(self):
        return self.base.config

    @property
    def main_input_name(self) -> str:
        return getattr(self.base, "main_input_name", "input_ids")

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # -- one-file artifacts --------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """The base model's fingerprint (see artifact.base_fingerprint) from its weights as they are now:
        not cached, since full fine-tuning changes them between saves (and it costs a strided sample).
        While an adapter is merged, the base's as it was before the merge."""
        if self._merged is not None:
            return self._merged.fingerprint
        first, last = self.layer_sites[0], self.layer_sites[-1]
        probes = [probe_weight(m) for m in (self.base.get_input_embeddings(), first.attn_out, last.ffn_out)]
        return base_fingerprint(self.base, probes)

    def save_adapter(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        metrics: dict[str, float] | None = None,
        description: str = "",
        stacked_on: Sequence[str] | None = None,
        resumable: bool = False,
    ) -> Path:
        """Write adapter ``name`` (bottlenecks, norm affines, head) and its metadata to one
        ``.safetensors`` file, atomically.

        ``stacked_on``: the loaded adapters (bottom first) it was trained on top of, as
        ``Stack(*stacked_on, name)``; the metadata names each with the sha256 of its site tensors (never
        a path), and the adapter keeps the record (``adapter_info``). None: the record it already has
        (from ``load_adapter`` or an earlier save), if any.

        A kind may train in a form of its own (prefix tuning's reparameterisation MLP): the file holds
        its artifact form (``AdapterKind.export``: plain prefixes), unless ``resumable`` (training
        checkpoints), which keeps the training form so that a resumed run continues exactly."""
        adapter = self._get(name)
        if stacked_on is not None:
            if isinstance(stacked_on, str) or name in stacked_on or len(set(stacked_on)) != len(stacked_on):
                raise ValueError(f"stacked_on is a list of other adapters' names, each once; got {stacked_on!r}")
            adapter.stacked_on = [{"name": n, "sha256": member_digest(self._get(n)), "kind": self._get(n).config.kind}
                                  for n in stacked_on]
        tensors, config, extra = adapter.state_dict(), adapter.config, {}
        export = config.kind_spec.export
        if export is not None and not resumable:
            tensors, config, extra = export(adapter)
        metadata = build_metadata(name, config, self.hidden_size, adapter.task, adapter.head_spec,
                                  self.fingerprint(), metrics, description)
        metadata.update(extra)
        if getattr(adapter, "stacked_on", None):  # absent for an adapter trained alone
            metadata["stacked_on"] = [dict(e) for e in adapter.stacked_on]
        return write_artifact(path, tensors, metadata)

    def load_adapter(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        *,
        check_base: bool = True,
        dtype: torch.dtype | None = None,
    ) -> str:
        """Load one artifact (a file path, or ``"hub:namespace/name@version"``) as adapter ``name``
        (default: the name saved in it). Costs time in proportion to this adapter alone.

        Also a folder saved by PEFT or the adapters library (``adapter_config.json``; converted
        exactly, or refused naming what does not map: ``adapterkit.interop``), and
        ``"hf:org/name[@revision]"`` from the Hugging Face Hub (through ``huggingface_hub``'s cache).

        Everything is checked before the model changes: a bad file, metadata, base model or shape
        raises and leaves the model exactly as it was.
        """
        if isinstance(path, str) and path.startswith("hub:"):
            from .hub import resolve_reference  # the hub is optional; imported only when used

            path = resolve_reference(path)
        if isinstance(path, str) and path.startswith("hf:"):
            from .interop.hf import resolve_hf  # huggingface_hub's cache: a snapshot folder or file

            path = resolve_hf(path)
        if Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file():
            from .interop import load_foreign  # a PEFT or adapters-library folder, converted exactly

            return load_foreign(path, self, name=name, dtype=dtype)
        # From the header alone, before any tensor is read or module built: the tensors' names and
        # shapes must be exactly those the metadata's config implies for this model (memory follows
        # from the file's size, never from a size its metadata claims).
        check_artifact_shapes(
            path,
            self.hidden_size,
            [len(ls.norms) for ls in self.layer_sites],
            self.sites.pooling,
            expected_base=self.fingerprint() if check_base else None,
            dims_per_layer=self._all_site_dims(),
        )
        artifact = read_artifact(path)
        meta = artifact.metadata
        name = name or meta["name"]
        self._check_new_name(name)
        if check_base and not fingerprints_match(self.fingerprint(), meta["base"]):
            raise BaseModelMismatch(str(path), self.fingerprint(), meta["base"])
        spec = check_adapter_metadata(meta, str(path))
        # what it was trained on top of: recorded, not loaded (check_stacked_on compares what is loaded)
        stacked_on = stacked_on_of(meta, str(path))
        try:
            adapter = self._build(spec.config, spec.task_type, spec.labels, spec.head_dropout, dtype)
        except ValueError as e:
            raise ArtifactError(f"{path}: {e}") from None
        load_tensors_strict(adapter, artifact.tensors or {}, str(path))
        if stacked_on:
            adapter.stacked_on = stacked_on
        adapter.train(self.training)
        self.adapters[name] = adapter
        return name


# ---------------------------------------------------------------------------------------------


def check_stacked_on(model: AdapterModel, name: str) -> str | Stack:
    """The route adapter ``name`` was trained under: ``Stack(*under, name)``, or ``name`` for one trained
    alone. ValueError when an adapter it was trained on top of is not loaded, or is loaded with other
    tensors than it had then (sha256 of its site tensors, ``fusion.member_digest``)."""
    under = model.adapter_info(name)["stacked_on"]
    if not under:
        return name
    for entry in under:
        if entry["name"] not in model.adapters:
            raise ValueError(
                f"adapter {name!r} was trained on top of {[e['name'] for e in under]} (bottom first); "
                f"{entry['name']!r} is not loaded: load its artifact first"
            )
        digest = member_digest(model.adapters[entry["name"]])
        if digest != entry["sha256"]:
            raise ValueError(
                f"adapter {name!r} was trained on top of another {entry['name']!r} than the one loaded "
                f"(sha256 {digest[:12]} loaded vs {entry['sha256'][:12]} when trained): load the artifact "
                "it was trained with, or retrain it"
            )
    return Stack(*(e["name"] for e in under), name)


def _hidden_size(config: Any) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size in {type(config).__name__}")


def _head_dropout(doc: dict[str, Any]) -> float:
    dropout = (doc.get("head") or {}).get("dropout", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ArtifactError(f"head dropout must be a number in [0, 1); got {dropout!r}")
    return float(dropout)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _batch_size(inputs: dict[str, Any]) -> int | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "attention_mask"):
        v = inputs.get(key)
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    return None
