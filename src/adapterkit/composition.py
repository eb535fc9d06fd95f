"""Composition blocks: several adapters on one row (``Stack``, ``Average``), one input for several tasks
(``Parallel``), and the route that runs compositions per row.

A row of ``adapter_names`` may be a composition::

    model(**batch, adapter_names=[Stack("domain", "ner"), "sentiment", Average("a", "b"), None])

At every hooked site, with ``f_m`` the site's module of member ``m`` (the identity where it has none):

- ``Stack(a, b, ...)``: each member on the output of the one before — ``f_b(f_a(out))`` (MAD-X: a
  language adapter under a task adapter). A member fed by the sublayer's input (parallel bottlenecks,
  LoRA) reads that input, as it would alone.
- ``Average(a, b, ..., weights=w)``: ``Σ_m w_m · f_m(out)``, the output average at every site; ``w``
  defaults to equal weights and is normalised to sum 1 unless ``normalize=False``. (Weight-space
  averaging, which yields a new adapter, is ``AdapterModel.average_adapter``.)

- ``Fuse(a, b, ..., fusion="f")``: AdapterFusion (Pfeiffer et al. 2021): each member's output
  ``r_m = f_m(out)``, combined per token by the trained fusion ``f``'s attention over the members
  (``fusion.py``; ``AdapterModel.add_fusion``). Members are adapter names without norm affines.

Members nest (``Stack("lang", Average("t1", "t2"))``, ``Stack("lang", Fuse(...))``; a Fuse's members are
names only). Norm affines compose in closed form: Stack of
(s1, h1), (s2, h2) is (s1·s2, h1·s2 + h2); Average is (Σ w·s, Σ w·h). A composed row's task head is its
last member's (for a nested last member, that block's last member's).

``Parallel(a, b, ...)`` is not a row's composition: it is a whole batch's (``adapter_names=Parallel(...)``)
and gives one output per member — see ``AdapterModel.forward_parallel``.

How a batch runs: rows are grouped by the *shape* of their composition (names stripped: plain rows
are all one shape). Within a group every row has the same tree, so each leaf of the tree, across the
group's rows, is an ordinary ``Route`` (single or mixed, any kinds); a site evaluates the tree on the
group's rows and writes them back. Shapes: B rows (each repeated ``rep`` times under ``generate``),
T tokens, d hidden size, G rows in a group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .routing import Route
from .stacks import StackStore
from .task_adapter import TaskAdapter

# Bounds on one row's composition, so a request cannot make a route of unbounded size.
MAX_DEPTH = 4
MAX_LEAVES = 16


class Block:
    """A composition of adapters: names (str) or other blocks."""

    kind = "block"

    def __init__(self, *members: str | Block):
        if len(members) == 1 and isinstance(members[0], list | tuple):
            members = tuple(members[0])  # Stack(["a", "b"]) as well as Stack("a", "b")
        self.members: tuple[str | Block, ...] = tuple(members)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return (self.kind, self.members)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.members))})"

    def leaves(self) -> list[str]:
        """The adapter names in this block, depth first, left to right."""
        out: list[str] = []
        for m in self.members:
            out.extend(m.leaves() if isinstance(m, Block) else [m])
        return out

    def to_json(self) -> dict[str, Any]:
        return {self.kind: [m.to_json() if isinstance(m, Block) else m for m in self.members]}

    def renamed(self, names: dict[str, str]) -> Block:
        """The same block with each adapter name ``n`` replaced by ``names[n]`` (the server's
        references by the adapters' names in the model)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.members = tuple(m.renamed(names) if isinstance(m, Block) else names[m] for m in self.members)
        return copy


class Stack(Block):
    """Members applied one after another at every site (the first nearest the base model)."""

    kind = "stack"


class Average(Block):
    """The weighted average of the members' outputs at every site."""

    kind = "average"

    def __init__(self, *members: str | Block, weights: Sequence[float] | None = None, normalize: bool = True):
        super().__init__(*members)
        n = len(self.members)
        w = [1.0] * n if weights is None else [float(x) for x in weights]
        if len(w) != n:
            raise ValueError(f"Average has {n} members but {len(w)} weights")
        if not all(math.isfinite(x) for x in w):
            raise ValueError(f"Average weights must be finite numbers; got {list(weights or [])}")
        if normalize:
            total = sum(w)
            if total <= 0:
                raise ValueError(f"Average weights must have a positive sum to be normalised; got {w}")
            w = [x / total for x in w]
        self.weights: tuple[float, ...] = tuple(w)

    def _key(self) -> tuple:
        return (self.kind, self.members, self.weights)

    def __repr__(self) -> str:
        return f"Average({', '.join(map(repr, self.members))}, weights={list(self.weights)})"

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "weights": list(self.weights)}


class Parallel(Block):
    """One input, one output per member: the whole batch runs once per member, sharing the layers
    below the first adapted one."""

    kind = "parallel"


class Fuse(Block):
    """AdapterFusion: the members' outputs at every site, combined per token by the fusion layers of
    ``fusion`` (built by ``AdapterModel.add_fusion`` over the same members); the fusion's head answers
    for the row. Members are adapter names (no blocks), each at most once."""

    kind = "fuse"

    def __init__(self, *members: str | Block, fusion: str):
        super().__init__(*members)
        if not isinstance(fusion, str) or not fusion:
            raise ValueError(f"Fuse needs the name of a fusion (fusion='...'); got {fusion!r}")
        self.fusion = fusion

    def _key(self) -> tuple:
        return (self.kind, self.members, self.fusion)

    def __repr__(self) -> str:
        return f"Fuse({', '.join(map(repr, self.members))}, fusion={self.fusion!r})"

    def to_json(self) -> dict[str, Any]:
        # (from_json does not read it yet: the server answers with a composition's last member's head,
        # and a fused row's head is its fusion's)
        return {**super().to_json(), "fusion": self.fusion}


Entry = str | Block | None


def check_entry(entry: Entry, known: Callable[[str], Any] | None = None,
                fusions: Callable[[str], Any] | None = None) -> None:
    """Validate one row's entry: a name, None, or a Stack / Average / Fuse of them, bounded in depth and size.

    ``known``: looks a name up (raising KeyError for an unknown one). ``fusions``: looks a fusion up
    (KeyError for an unknown one); each Fuse is checked against it (its members, ``fusion.check_members``).
    ValueError / TypeError / KeyError with a message naming what is wrong.
    """
    if entry is None or isinstance(entry, str):
        if isinstance(entry, str) and known is not None:
            known(entry)
        return
    if isinstance(entry, Parallel):
        raise ValueError("Parallel gives one output per member for a whole batch (adapter_names=Parallel(...), "
                         "in forward): it cannot be one row's entry or be nested in another block")
    if not isinstance(entry, Block):
        raise TypeError(f"an adapter_names entry must be a name, None, Stack, Average or Fuse; got {type(entry).__name__}")
    _check_block(entry, known, depth=1, fusions=fusions)
    if len(entry.leaves()) > MAX_LEAVES:
        raise ValueError(f"a composition may name at most {MAX_LEAVES} adapters; {entry!r} names {len(entry.leaves())}")


def _check_block(block: Block, known: Callable[[str], Any] | None, depth: int,
                 fusions: Callable[[str], Any] | None = None) -> None:
    name = type(block).__name__
    if depth > MAX_DEPTH:
        raise ValueError(f"compositions nest at most {MAX_DEPTH} deep")
    if len(block.members) < 2:
        raise ValueError(f"{name} needs at least two members; got {len(block.members)}")
    if isinstance(block, Fuse):
        _check_fuse(block, known, fusions)
        return
    for m in block.members:
        if isinstance(m, Parallel):
            raise ValueError(f"Parallel cannot be nested in {name}: it applies to a whole batch")
        if isinstance(m, Block):
            _check_block(m, known, depth + 1, fusions)
        elif isinstance(m, str):
            if known is not None:
                known(m)
        else:
            raise TypeError(f"{name} members must be adapter names or blocks; got {m!r}")


def _check_fuse(block: Fuse, known: Callable[[str], Any] | None, fusions: Callable[[str], Any] | None) -> None:
    bad = [m for m in block.members if not isinstance(m, str)]
    if bad:
        raise TypeError(f"Fuse members must be adapter names (the fusion was trained on those adapters' "
                        f"outputs); got {bad[0]!r}")
    if len(set(block.members)) != len(block.members):
        raise ValueError(f"Fuse names an adapter more than once: {list(block.members)}")
    if known is not None:
        for m in block.members:
            known(m)
    if fusions is None:
        return
    fusion = fusions(block.fusion)
    if set(fusion.members) != set(block.members):
        raise ValueError(f"fusion {block.fusion!r} fuses {list(fusion.members)}, but the block names "
                         f"{list(block.members)}: a fusion runs only over the adapters it was trained on")
    if known is not None:
        fusion.check_members(known)


def from_json(value: Any) -> Entry:
    """An entry from its JSON form: a name, null, ``{"stack": [...]}``, ``{"average": [...], "weights":
    [...]}`` or ``{"parallel": [...]}`` (the server's request format). ValueError when malformed."""
    return _from_json(value, depth=0)


def _from_json(value: Any, depth: int) -> Entry:
    if value is None or isinstance(value, str):
        return value
    if depth > MAX_DEPTH:
        raise ValueError(f"compositions nest at most {MAX_DEPTH} deep")
    if not isinstance(value, dict):
        raise ValueError(f"an adapter must be a name, null or a composition object; got {type(value).__name__}")
    kinds = [k for k in ("stack", "average", "parallel") if k in value]
    extra = set(value) - {"stack", "average", "parallel", "weights"}
    if len(kinds) != 1 or extra or ("weights" in value and kinds != ["average"]):
        raise ValueError('a composition is {"stack": [...]}, {"average": [...], "weights": [...]} or {"parallel": [...]}')
    members = value[kinds[0]]
    if not isinstance(members, list) or len(members) > MAX_LEAVES:
        raise ValueError(f"{kinds[0]} takes a list of at most {MAX_LEAVES} members")
    parsed = [_from_json(m, depth + 1) for m in members]
    if any(m is None for m in parsed):
        raise ValueError(f"{kinds[0]} members must be adapter names or compositions, not null")
    if kinds[0] == "stack":
        return Stack(*parsed)
    if kinds[0] == "parallel":
        return Parallel(*parsed)
    weights = value.get("weights")
    if weights is not None and (not isinstance(weights, list) or not all(isinstance(w, int | float) for w in weights)):
        raise ValueError("average weights must be a list of numbers")
    return Average(*parsed, weights=weights)


def head_name(entry: Entry) -> str | None:
    """The adapter whose task head answers for this entry: a block's last member, recursively. (A
    Fuse's head is its fusion's: see ``_head_owner``.)"""
    while isinstance(entry, Block):
        entry = entry.members[-1]
    return entry


def _head_owner(entry: Entry, lookup: Callable[[str], Any], fusions: Callable[[str], Any] | None) -> Any:
    """The module whose task head answers for this entry: a Fuse's fusion, else a block's last member."""
    while isinstance(entry, Block):
        if isinstance(entry, Fuse):
            if fusions is None:
                raise ValueError("a Fuse entry needs the model's fusions")
            return fusions(entry.fusion)
        entry = entry.members[-1]
    return None if entry is None else lookup(entry)


# ---------------------------------------------------------------------------------------------
# Running compositions per row
# ---------------------------------------------------------------------------------------------


def _shape(entry: Entry) -> Any:
    """The composition's tree with names stripped (rows of one shape run as one group)."""
    if not isinstance(entry, Block):
        return "leaf"
    inner = tuple(_shape(m) for m in entry.members)
    if isinstance(entry, Fuse):  # the fusion's name is part of the shape: one group per fusion
        return ("fuse", entry.fusion, inner)
    return ("average", entry.weights, inner) if isinstance(entry, Average) else ("stack", inner)


def _program(shape: Any, counter: list[int]) -> tuple:
    """The shape with each leaf numbered depth first: ("leaf", j), ("stack", children), ("average", w,
    children), ("fuse", fusion name, children)."""
    if shape == "leaf":
        counter[0] += 1
        return ("leaf", counter[0] - 1)
    if shape[0] == "stack":
        return ("stack", tuple(_program(s, counter) for s in shape[1]))
    return (shape[0], shape[1], tuple(_program(s, counter) for s in shape[2]))


def _leaf_names(entry: Entry) -> list[str | None]:
    return entry.leaves() if isinstance(entry, Block) else [entry]


def _fusion_names(entry: Entry) -> list[str]:
    if not isinstance(entry, Block):
        return []
    own = [entry.fusion] if isinstance(entry, Fuse) else []
    return own + [f for m in entry.members for f in _fusion_names(m)]


@dataclass(eq=False)
class _Group:
    rows: list[int]  # indices into the batch's rows (before generate's repeats)
    program: tuple
    routes: list[Route | None]  # one per leaf of the program, over this group's rows
    _index: dict[Any, torch.Tensor] = field(default_factory=dict)

    def index(self, rep: int, device: torch.device) -> torch.Tensor:
        """(G·rep,) the batch rows of this group (each row's repeats are consecutive)."""
        key = (rep, device)
        if key not in self._index:
            self._index[key] = torch.tensor([i * rep + j for i in self.rows for j in range(rep)], device=device)
        return self._index[key]


@dataclass(eq=False)
class CompositeRoute(Route):
    """A route whose rows may be compositions. ``rows`` holds each row's head adapter (its last member),
    so the heads, row counts and norm wrappers see an ordinary route; the sites evaluate each group's
    composition tree over ordinary sub-routes."""

    groups: list[_Group] = field(default_factory=list)
    # fusion name -> its fusion module (``fusion.AdapterFusion``: ``site(layer, position)``), for Fuse nodes
    fusions: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_entries(
        cls, entries: Sequence[Entry], lookup: Callable[[str], TaskAdapter], store: StackStore | None,
        repeats_rows: bool = False, fusions: Callable[[str], Any] | None = None,
    ) -> CompositeRoute:
        by_shape: dict[Any, list[int]] = {}
        for i, e in enumerate(entries):
            by_shape.setdefault(_shape(e), []).append(i)
        groups = []
        for shape, rows in by_shape.items():
            program = _program(shape, [0])
            names = [_leaf_names(entries[i]) for i in rows]  # (G, leaves)
            routes = []
            for j in range(len(names[0])):
                route = Route.for_rows([None if n[j] is None else lookup(n[j]) for n in names], store)
                if route is not None:
                    route.repeats_rows = repeats_rows
                routes.append(route)
            groups.append(_Group(rows, program, routes))
        heads = [_head_owner(e, lookup, fusions) for e in entries]
        used = {f for e in entries for f in _fusion_names(e)}
        return cls(heads, store=store, repeats_rows=repeats_rows, groups=groups,
                   fusions={f: fusions(f) for f in used} if used else {})

    def __post_init__(self) -> None:
        super().__post_init__()
        # every adapter of every leaf (for delete_adapter's check that no route still uses one)
        self.adapters = list({id(a): a for g in self.groups for r in g.routes if r is not None
                              for a in r.adapters}.values())

    def _routes(self):
        return (r for g in self.groups for r in g.routes if r is not None)

    def needs_input(self, layer: int, position: str) -> bool:
        key = ("input", layer, position)
        if key not in self.cache:
            self.cache[key] = any(r.needs_input(layer, position) for r in self._routes())
        return self.cache[key]

    def _touches(self, layer: int, position: str) -> bool:
        key = ("touches", layer, position)
        if key not in self.cache:
            self.cache[key] = any(any(m is not None for m in r.members((layer, position))) for r in self._routes())
        return self.cache[key]

    def apply_with(self, layer: int, position: str, out: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor | None:
        if layer < self.drop_below or not self._touches(layer, position):
            return None
        n = out.shape[0]
        rep = self.check_rows(n)
        if len(self.groups) == 1:
            return self._run(self.groups[0], self.groups[0].program, layer, position, out, captured)
        if captured is not None:
            captured = captured.reshape(n, -1, captured.shape[-1])  # rows lead, whether flat or not
        changed = False
        for group in self.groups:
            index = group.index(rep, out.device)
            sub = out.index_select(0, index)
            new = self._run(group, group.program, layer, position, sub,
                            None if captured is None else captured.index_select(0, index))
            if new is None:
                continue
            changed = True
            out = out.index_copy(0, index, new) if torch.is_grad_enabled() else out.index_copy_(0, index, new)
        return out if changed else None

    def _run(self, group: _Group, node: tuple, layer: int, position: str, out: torch.Tensor,
             captured: torch.Tensor | None) -> torch.Tensor | None:
        """One composition tree at one site on a group's rows; None: the output is unchanged."""
        if node[0] == "leaf":
            route = group.routes[node[1]]
            return None if route is None else route.apply_with(layer, position, out, captured)
        if node[0] == "stack":
            changed = False
            for child in node[1]:
                new = self._run(group, child, layer, position, out, captured)
                if new is not None:
                    out, changed = new, True
            return out if changed else None
        if node[0] == "fuse":
            return self._fuse(group, node, layer, position, out, captured)
        weights, children = node[1], node[2]
        results, changed = [], False
        for k, child in enumerate(children):
            # each branch its own copy: branches may add into their input in place (the last may
            # take ``out`` itself: every other branch has read it by then)
            src = out if k == len(children) - 1 else out.clone()
            new = self._run(group, child, layer, position, src, captured)
            changed = changed or new is not None
            results.append(src if new is None else new)
        if not changed:
            return None
        total = results[0] * weights[0]
        for w, r in zip(weights[1:], results[1:]):
            total = total.add_(r, alpha=w) if not torch.is_grad_enabled() else total.add(r, alpha=w)
        return total

    def _fuse(self, group: _Group, node: tuple, layer: int, position: str, out: torch.Tensor,
              captured: torch.Tensor | None) -> torch.Tensor | None:
        """A Fuse node: every member's output r_m (each on its own copy, as Average's branches), then the
        fusion's layer at this site combines them per token (``fusion.FusionSite``)."""
        site = self.fusions[node[1]].site(layer, position)
        if site is None:  # no member acts here (the fusion has layers exactly where members do)
            return None
        query = site.query_key(out)  # from ``out`` before the last member may add into it in place
        results = []
        for k, child in enumerate(node[2]):
            src = out if k == len(node[2]) - 1 else out.clone()
            new = self._run(group, child, layer, position, src, captured)
            results.append(src if new is None else new)
        return site.combine(query, results)

    # -- norms -----------------------------------------------------------------------------------

    def norm_affine(self, layer: int, index: int, dtype: torch.dtype, device: torch.device):
        """Per-row (scale, shift), each (B, 1, d), composed over each row's tree; None: identity."""
        if layer < self.drop_below:
            return None
        parts = [(g, self._norm(g, g.program, layer, index, dtype, device)) for g in self.groups]
        if all(a is None for _, a in parts):
            return None
        if len(parts) == 1:
            return parts[0][1]
        d = next(a for _, a in parts if a is not None)[0].shape[-1]
        scale = torch.ones(len(self.rows), 1, d, dtype=dtype, device=device)
        shift = torch.zeros(len(self.rows), 1, d, dtype=dtype, device=device)
        for group, affine in parts:
            if affine is not None:
                rows = torch.tensor(group.rows, device=device)
                scale, shift = scale.index_copy(0, rows, affine[0]), shift.index_copy(0, rows, affine[1])
        return scale, shift

    def _norm(self, group: _Group, node: tuple, layer: int, index: int, dtype: torch.dtype, device: torch.device):
        if node[0] == "leaf":
            route = group.routes[node[1]]
            if route is None:
                return None
            if route.single is None:
                return route.norm_affine(layer, index, dtype, device)
            affine = route.single.norm(layer, index)
            if affine is None:
                return None
            g = len(group.rows)
            return (affine.scale.to(dtype)[None, None].expand(g, 1, -1),
                    affine.shift.to(dtype)[None, None].expand(g, 1, -1))
        if node[0] == "stack":
            acc = None
            for child in node[1]:
                affine = self._norm(group, child, layer, index, dtype, device)
                if affine is None:
                    continue
                acc = affine if acc is None else (acc[0] * affine[0], acc[1] * affine[0] + affine[1])
            return acc
        if node[0] == "fuse":  # members have no norm affines (check_entry: fusion.check_members)
            return None
        weights, children = node[1], node[2]
        affines = [self._norm(group, c, layer, index, dtype, device) for c in children]
        live = next((a for a in affines if a is not None), None)
        if live is None:
            return None
        scale, shift = torch.zeros_like(live[0]), torch.zeros_like(live[1])
        for w, a in zip(weights, affines):
            if a is None:  # identity: scale 1, shift 0
                scale = scale + w
            else:
                scale, shift = scale + w * a[0], shift + w * a[1]
        return scale, shift


# ---------------------------------------------------------------------------------------------
# Parallel: one input, one output per member, the layers below the first adapted one run once
# ---------------------------------------------------------------------------------------------


def lowest_adapted_layer(adapters: Sequence[TaskAdapter]) -> int | None:
    """The lowest layer where any of ``adapters`` has a module or a norm affine; None: nowhere."""
    layers = [key[0] for a in adapters for key in a._lookup()]
    return min(layers) if layers else None


def repeat_rows(value: Any, batch: int, copies: int) -> Any:
    """A layer's argument with its batch repeated ``copies`` times, member-major ([x; x; ...]): every
    tensor of two or more dimensions that leads with ``batch`` rows (hidden states, masks, position
    embeddings), inside tuples and lists too; anything else (already repeated, or not per row) as is."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            return value.repeat(copies, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, tuple | list):
        return type(value)(repeat_rows(v, batch, copies) for v in value)
    return value


class SplitAbove:
    """Forward pre-hooks on the layers from ``first`` up that repeat a batch of ``batch`` rows
    ``copies`` times where it enters layer ``first``: the layers below run once for every copy.
    (The layers above get the repeated rows already; their other per-row arguments are repeated
    as they come in.)"""

    def __init__(self, layers: Sequence[torch.nn.Module], batch: int, copies: int):
        self.layers, self.batch, self.copies = list(layers), batch, copies
        self.handles: list[Any] = []

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (repeat_rows(args, self.batch, self.copies),
                {k: repeat_rows(v, self.batch, self.copies) for k, v in kwargs.items()})

    def __enter__(self) -> SplitAbove:
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass(eq=False)
class ChunkedRoute(Route):
    """Parallel's route: the batch is N contiguous chunks of B rows, chunk m routed by member m's own
    route (``parts``; None: no adapter), so a member that is one adapter takes the single-adapter path
    on its slice (no per-row weight gathers). ``rows`` holds each row's head adapter, for the heads."""

    parts: list[Route | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.adapters = list({id(a): a for r in self.parts if r is not None for a in r.adapters}.values())

    def needs_input(self, layer: int, position: str) -> bool:
        key = ("input", layer, position)
        if key not in self.cache:
            self.cache[key] = any(r is not None and r.needs_input(layer, position) for r in self.parts)
        return self.cache[key]

    def _touches(self, layer: int, position: str) -> bool:
        key = ("touches", layer, position)
        if key not in self.cache:
            self.cache[key] = any(
                r is not None and (r._touches(layer, position) if isinstance(r, CompositeRoute)
                                   else any(m is not None for m in r.members((layer, position))))
                for r in self.parts)
        return self.cache[key]

    def apply_with(self, layer: int, position: str, out: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor | None:
        if layer < self.drop_below or not self._touches(layer, position):
            return None  # (below the first adapted layer the batch has B rows, not N·B)
        n = out.shape[0]
        self.check_rows(n)
        per = n // len(self.parts)
        if captured is not None:
            captured = captured.reshape(n, -1, captured.shape[-1])
        results, in_place, changed = [], True, False
        for m, route in enumerate(self.parts):
            part = out[m * per : (m + 1) * per]  # (B, T, d): a view
            new = None if route is None else route.apply_with(
                layer, position, part, None if captured is None else captured[m * per : (m + 1) * per])
            if new is None:
                results.append(part)
                continue
            results.append(new)
            changed = True
            # single adapters add into their slice in place when autograd is off
            in_place = in_place and new.data_ptr() == part.data_ptr() and new.shape == part.shape
        if not changed:
            return None
        if in_place and not torch.is_grad_enabled():
            return out
        return torch.cat(results)

    def norm_affine(self, layer: int, index: int, dtype: torch.dtype, device: torch.device):
        """(N·B, 1, d) per-row (scale, shift), chunk by chunk; None: identity everywhere."""
        if layer < self.drop_below:
            return None
        per = len(self.rows) // len(self.parts)
        affines = []
        for route in self.parts:
            if route is None:
                affines.append(None)
            elif route.single is not None:
                a = route.single.norm(layer, index)
                affines.append(None if a is None else (a.scale.to(dtype)[None, None].expand(per, 1, -1),
                                                       a.shift.to(dtype)[None, None].expand(per, 1, -1)))
            else:
                affines.append(route.norm_affine(layer, index, dtype, device))
        live = next((a for a in affines if a is not None), None)
        if live is None:
            return None
        d = live[0].shape[-1]
        ones = torch.ones(per, 1, d, dtype=dtype, device=device)
        zeros = torch.zeros(per, 1, d, dtype=dtype, device=device)
        return (torch.cat([ones if a is None else a[0] for a in affines]),
                torch.cat([zeros if a is None else a[1] for a in affines]))
