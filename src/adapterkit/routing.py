"""Per-row routing: which adapter each row of the current forward pass uses, the ContextVar that
carries it to the hooks, and each row's task head.

Free of adapter kinds: a site's modules bring their own maths (``kinds/interface.py``); this module
only resolves rows to modules, groups them by maths, hands over captured inputs and gathers weights.

Shapes: B rows, T tokens, d hidden size, K distinct adapters in a batch.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .kinds.interface import POSITIONS as _POSITIONS
from .stacks import StackStore
from .task_adapter import TaskAdapter
from .tasks import TASKS

# Mixed batches, per site: a module class whose rows are at least this share of the batch runs over
# the whole batch (rows of other classes get zero weights: no copies); smaller classes run on their own
# rows only. Within such a class, at most SPLIT_ADAPTERS adapters with SPLIT_ROWS rows each on average
# run one by one with their own weights (no gathered weights); more share one gathered pass.
WHOLE_BATCH_SHARE = 0.75
SPLIT_ADAPTERS = 8
SPLIT_ROWS = 2


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
    # sublayer inputs captured for input-fed modules, per (thread, layer, position): the default
    # route is shared by threads
    captured: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)
    store: StackStore | None = None  # the model's weight stacks; a route without one keeps its own
    # AdapterDrop: layers below this index run without adapters (their norms' affines too), so in
    # training no gradient work happens there
    drop_below: int = 0

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
        """Each distinct adapter's module at one site, (layer, position) or (layer, norm index)."""
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = [a._lookup().get(key) for a in self.adapters]
        return hit

    # -- captured sublayer inputs ----------------------------------------------------------------

    def needs_input(self, layer: int, position: str) -> bool:
        """Whether some module at this site reads the sublayer's input (a pre-hook keeps it)."""
        key = ("input", layer, position)
        if key not in self.cache:
            self.cache[key] = any(m is not None and m.feed == "input" for m in self.members((layer, position)))
        return self.cache[key]

    def keep_input(self, layer: int, position: str, inp: torch.Tensor) -> None:
        self.captured[(threading.get_ident(), layer, position)] = inp

    def take_input(self, layer: int, position: str) -> torch.Tensor | None:
        return self.captured.pop((threading.get_ident(), layer, position), None)

    # -- rows ------------------------------------------------------------------------------------

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

    def gather(self, key: tuple, members: list[Any], dtype: torch.dtype, device: torch.device, zeros, pack) -> list[torch.Tensor]:
        """Per-row weights (B, ...) of one site: row i gets ``pack(member of its adapter)``, or ``zeros()``.
        Inference: from the store. Autograd: stacked afresh, so that gradients reach each adapter's
        parameters. ``key`` names the site and everything that shapes the stacked tensors but dtype
        and device (each maths its own prefix: ``("site", ...)``, ``("norm", ...)``)."""
        if not torch.is_grad_enabled():
            return self.store.gather((*key, dtype, device), members, self.slots, zeros, pack)
        empty = zeros()
        slot_packs = [empty] + [empty if m is None else pack(m) for m in members]
        index = self.slot_index(device)
        return [torch.stack([p[i] for p in slot_packs])[index] for i in range(len(empty))]

    # -- sites -----------------------------------------------------------------------------------

    def apply_site(self, layer: int, position: str, out: torch.Tensor) -> torch.Tensor | None:
        """The hooked module's output with this route's adapters applied; None to leave it untouched."""
        captured = self.take_input(layer, position)  # always: a kept input must not outlive its call
        return self.apply_with(layer, position, out, captured)

    def apply_with(self, layer: int, position: str, out: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor | None:
        """``apply_site`` given the position's captured input (None when nothing here is fed by it);
        composed routes call it once per member on the same captured input."""
        if layer < self.drop_below:
            return None
        if self.single is not None:
            m = self.single.site(layer, position)
            if m is None:
                return None
            return m.apply_single(out, captured if m.feed == "input" else out)
        plans = self._site_plans(layer, position)
        if not plans:
            return None
        if len(plans) == 1 and plans[0][0] is None:  # one pass over the whole batch
            _, maths, plan = plans[0]
            return maths.apply_mixed(self, layer, position, plan, out, captured)
        return self._apply_plans(plans, layer, position, out, captured)

    def _apply_plans(self, plans: list, layer: int, position: str, out: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor | None:
        """Several passes at one site (``_site_plans``), each on the whole batch or on its own rows."""
        n = out.shape[0]
        rep = self.check_rows(n)
        grad = torch.is_grad_enabled()
        # in place only into the hooked module's fresh output, never into an input another module
        # holds (a position acting on a module's input), until ``out`` is a tensor of our own
        own = not grad and _POSITIONS[position].acts_on == "output"
        if captured is not None:
            captured = captured.reshape(n, -1, captured.shape[-1])  # rows lead, flat or not
        changed = False
        for rows, maths, plan in plans:
            if rows is None:  # the whole batch (sorted first); rows of the other passes see zero weights
                new = maths.apply_mixed(self, layer, position, plan, out, captured)
                if new is not None:
                    own = own or (not grad and new.untyped_storage().data_ptr() != out.untyped_storage().data_ptr())
                    out, changed = new, True
                continue
            index = self._row_index(rows, rep, out.device)
            sub_out = out.index_select(0, index)  # (b, ...): this pass's rows
            if isinstance(plan, tuple):  # several adapters: a sub-route of these rows, its whole-batch plan
                sub, sub_plan = plan
                sub_in = captured.index_select(0, index) if captured is not None and sub.needs_input(layer, position) else None
                new = maths.apply_mixed(sub, layer, position, sub_plan, sub_out, sub_in)
            elif plan.feed == "input":  # one adapter: its own weights, nothing gathered
                new = plan.apply_single(sub_out, None if captured is None else captured.index_select(0, index))
            else:
                new = plan.apply_single(sub_out, sub_out)
            if new is None:
                continue
            new = new.reshape(sub_out.shape)
            out = out.index_copy_(0, index, new) if own else out.index_copy(0, index, new)
            changed, own = True, not grad
        return out if changed else None

    def _row_index(self, rows: tuple[int, ...], rep: int, device: torch.device) -> torch.Tensor:
        """(len(rows) * rep,) batch indices of some route rows, each repeated ``rep`` times in a row."""
        key = ("rows", rows, rep, device)
        index = self.cache.get(key)
        if index is None:
            index = self.cache[key] = torch.tensor([i * rep + j for i in rows for j in range(rep)], device=device)
        return index

    def _site_plans(self, layer: int, position: str) -> list[tuple[tuple[int, ...] | None, type, Any]]:
        """How this site runs in a mixed batch, once per route: (rows, module class, plan) per pass.

        ``rows`` None: one ``apply_mixed`` over the whole batch, ``plan`` the class's mixed plan (rows
        of other classes see zero weights). A class covering most of the batch runs so (no copies);
        the others run on their own rows only (copied out, then back), so that a batch mixing kinds
        pays for each row about once, not once per class. ``plan`` is then the one adapter's module
        (``apply_single`` on its rows), or, for several adapters, (sub-route of the rows, its plan)."""
        key = ("plan", layer, position)
        plans = self.cache.get(key)
        if plans is None:
            plans = self.cache[key] = self._plan_site(layer, position)
        return plans

    def _plan_site(self, layer: int, position: str) -> list[tuple[tuple[int, ...] | None, type, Any]]:
        members = self.members((layer, position))
        classes = {type(m) for m in members if m is not None}
        if len(classes) == 1 and None not in members and 0 not in self.slots:  # one class on every row
            cls = classes.pop()
            plan = cls.mixed_plan(members, self.slots)
            return [] if plan is None else [(None, cls, plan)]
        by_class: dict[type, list[int]] = {}  # class -> the route rows whose module here is of it
        for i, s in enumerate(self.slots):
            m = members[s - 1] if s else None
            if m is not None:
                by_class.setdefault(type(m), []).append(i)
        if not by_class:
            return []
        # a position acting on a module's input must return a tensor of its own (never write into that
        # input): the widest class's pass over the whole batch makes one, cheaper than a copy of it
        widest = max(by_class, key=lambda c: len(by_class[c])) if _POSITIONS[position].acts_on != "output" else None
        plans: list[tuple[tuple[int, ...] | None, type, Any]] = []
        for cls, rows in by_class.items():
            if cls is widest or len(rows) >= WHOLE_BATCH_SHARE * len(self.rows):
                own = members if len(by_class) == 1 else [m if type(m) is cls else None for m in members]
                plan = cls.mixed_plan(own, self.slots)
                if plan is not None:
                    plans.append((None, cls, plan))
                continue
            by_adapter: dict[int, list[int]] = {}  # slot -> its rows
            for i in rows:
                by_adapter.setdefault(self.slots[i], []).append(i)
            k = len(by_adapter)
            if k == 1 or (k <= SPLIT_ADAPTERS and len(rows) >= SPLIT_ROWS * k):
                # few adapters, several rows each: each on its own rows with its own weights
                plans.extend((tuple(r), cls, members[slot - 1]) for slot, r in by_adapter.items())
                continue
            sub = Route([self.rows[i] for i in rows], store=self.store, repeats_rows=self.repeats_rows)
            plan = cls.mixed_plan(sub.members((layer, position)), sub.slots)
            if plan is not None:
                plans.append((tuple(rows), cls, (sub, plan)))
        plans.sort(key=lambda p: p[0] is not None)  # whole-batch passes first: they may add in place
        return plans

    # -- norms -----------------------------------------------------------------------------------

    def norm_affine(self, layer: int, index: int, dtype: torch.dtype, device: torch.device):
        """Per-row (scale, shift) of one norm, each (B, 1, d); None when no row's task trains it."""
        if layer < self.drop_below:
            return None
        members = self.members((layer, index))
        live = next((n for n in members if n is not None), None)
        if live is None:
            return None
        d = live.scale.shape[0]

        def identity():
            return torch.ones(d, dtype=dtype, device=device), torch.zeros(d, dtype=dtype, device=device)

        scale, shift = self.gather(("norm", layer, index), members, dtype, device, identity,
                                   lambda n: (n.scale.to(dtype), n.shift.to(dtype)))
        return scale[:, None], shift[:, None]


# ---------------------------------------------------------------------------------------------
# Heads: each row's task head, after the base model's forward
# ---------------------------------------------------------------------------------------------


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def rows_with_heads(route: Route | None, batch: int | None) -> list[TaskAdapter] | None:
    """The per-row adapters whose heads produce this batch's logits; None when no head is in play
    (the base model's own outputs are then the answer)."""
    if route is None:
        return None
    if route.single is not None:
        rows = [route.single] * (batch or 1)
    else:
        route.check_rows(batch if batch is not None else len(route.rows))
        rows = route.rows
    with_head = [a is not None and a.head is not None for a in rows]
    if not any(with_head):
        return None
    if not all(with_head):
        raise ValueError("a batch mixes rows whose tasks have a head with rows that have none; run them separately")
    kinds = {TASKS[a.task["type"]].per_token for a in rows}
    if len(kinds) > 1:
        raise ValueError("a batch mixes sequence- and token-classification heads; run them separately")
    return rows


def apply_heads(rows: list[TaskAdapter], hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row through its own task's head: hidden (B, T, d) -> logits (B, L) or (B, T, L), L the widest
    label set; a row's labels beyond its own task's count are -inf."""
    if len({id(a) for a in rows}) == 1:
        return rows[0].head(hidden.to(_dtype(rows[0].head)), attention_mask)
    width = max(len(a.task["labels"]) for a in rows)
    groups: dict[int, list[int]] = {}
    for i, a in enumerate(rows):
        groups.setdefault(id(a), []).append(i)
    out_dtype = functools.reduce(torch.promote_types, (_dtype(rows[m[0]].head) for m in groups.values()))
    out = None
    for members in groups.values():
        head = rows[members[0]].head
        index = torch.tensor(members, device=hidden.device)
        mask = attention_mask[index] if attention_mask is not None else None
        logits = head(hidden[index].to(_dtype(head)), mask)  # a float32 head on a bf16 base
        if out is None:
            out = hidden.new_full((hidden.shape[0], *logits.shape[1:-1], width), float("-inf"), dtype=out_dtype)
        out[index, ..., : logits.shape[-1]] = logits.to(out_dtype)
    return out


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
