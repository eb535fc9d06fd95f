"""Weight stacks for mixed batches: each site's weights of many adapters side by side, kept across calls.

A mixed batch needs each row's weights side by side. Stacking them afresh would copy every adapter in
the batch at every site on every call; a ``StackStore`` copies each adapter in once (again only when
its weights change) and a call gathers its rows with one ``index_select`` per tensor.

A member of a stack is any module with a ``params`` property (its tensors, read live) whose ``_apply``
calls ``bump_epoch``: ``weights_key`` then tells when a stacked copy is stale.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def bump_epoch(module: nn.Module) -> None:
    """Mark a module's weights as moved (``.to()`` / ``.half()`` / ``.cuda()``): the new storage may
    reuse an old address, which ``weights_key`` alone would not notice."""
    module.__dict__["_epoch"] = module.__dict__.get("_epoch", 0) + 1


def weights_key(module: nn.Module) -> list[int]:
    """Changes whenever the module's weights do: in-place updates bump ``_version``; ``p.data = ...``
    swaps the storage (new address) without bumping it; ``.to()`` / ``.half()`` bump the epoch.
    (Writes through ``p.data`` in place are invisible to this, as they are to autograd.)"""
    params = module.params
    return [module.__dict__.get("_epoch", 0)] + [p._version for p in params] + [p.data_ptr() for p in params]


class _Stack:
    """One site's weights of many adapters, stacked along dim 0 (slot 0: zeros, for rows without an
    adapter), so that a mixed batch gathers its rows' weights with one ``index_select``."""

    def __init__(self, zeros: tuple[torch.Tensor, ...]):
        self.tensors = [z[None].clone() for z in zeros]  # each (capacity, ...)
        self.entries: dict[int, tuple[weakref.ref, list[int], int]] = {}  # id(member) -> (member, key, slot)
        self.used = 1
        self.free: list[int] = []

    def slots(self, members: Sequence[Any], pack: Callable[[Any], tuple[torch.Tensor, ...]]) -> list[int]:
        """Each member's slot (None: slot 0), copying in the members that are new or changed."""
        out = [0]
        get = self.entries.get
        for m in members:
            if m is None:
                out.append(0)
                continue
            key = weights_key(m)
            entry = get(id(m))
            if entry is not None and entry[1] == key and entry[0]() is m:
                out.append(entry[2])
                continue
            # new, or changed weights, or a dead module's id reused: (re)fill a slot in place
            slot = self._new_slot() if entry is None else entry[2]
            for stacked, value in zip(self.tensors, pack(m)):
                stacked[slot].copy_(value)
            self.entries[id(m)] = (weakref.ref(m), key, slot)
            out.append(slot)
        return out

    def forget(self, member: nn.Module) -> None:
        entry = self.entries.get(id(member))
        if entry is not None and entry[0]() is member:
            del self.entries[id(member)]
            self.free.append(entry[2])

    def _new_slot(self) -> int:
        if not self.free and self.used == self.tensors[0].shape[0]:
            # full: reclaim the slots of garbage-collected adapters, else double the capacity
            for k in [k for k, e in self.entries.items() if e[0]() is None]:
                self.free.append(self.entries.pop(k)[2])
            if not self.free:
                self.tensors = [torch.cat([t, torch.empty_like(t)]) for t in self.tensors]
        if self.free:
            return self.free.pop()
        self.used += 1
        return self.used - 1


class StackStore:
    """Per-site stacks of adapter weights for mixed batches, kept by a model across inference calls.

    Inference only: under autograd every forward builds its stacks in its own graph (``Route.gather``),
    so that gradients reach each adapter. Invalidation is per member: a changed ``weights_key`` refills
    that member's slot; ``forget`` (on ``delete_adapter``) frees it; an empty stack is dropped.
    """

    def __init__(self) -> None:
        self._stacks: dict[tuple, _Stack] = {}
        self._lock = threading.Lock()  # serving threads may share one model

    def __deepcopy__(self, memo: dict) -> StackStore:
        return StackStore()  # a copy of the model refills its own

    def gather(
        self,
        key: tuple,
        members: Sequence[Any],
        row_slots: Sequence[int],
        zeros: Callable[[], tuple[torch.Tensor, ...]],
        pack: Callable[[Any], tuple[torch.Tensor, ...]],
    ) -> list[torch.Tensor]:
        """Row-aligned weights (B, ...): row i gets ``pack(members[row_slots[i] - 1])``, or ``zeros()``
        where that slot is 0 or its member None. ``key`` names the site, dtype, device and width."""
        key = (*key, torch.is_inference_mode_enabled())  # inference tensors cannot be updated outside
        with self._lock:
            stack = self._stacks.get(key)
            if stack is None:
                stack = self._stacks[key] = _Stack(zeros())
            slots = stack.slots(members, pack)
            index = torch.tensor([slots[s] for s in row_slots], device=stack.tensors[0].device)
            return [t.index_select(0, index) for t in stack.tensors]

    def forget(self, members: Sequence[nn.Module]) -> None:
        """Drop these modules' copies (their adapter was deleted)."""
        with self._lock:
            for key, stack in list(self._stacks.items()):
                for m in members:
                    stack.forget(m)
                if not stack.entries:  # e.g. the last adapter of that width: free the whole stack
                    del self._stacks[key]
