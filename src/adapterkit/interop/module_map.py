"""Where another library's per-module weights go in adapterkit: module names <-> (layer, position).

PEFT and the adapters library name what they adapt by the module's path in the model
(``encoder.layer.0.attention.self.query``); adapterkit by layer index and position (``kinds.POSITIONS``:
q, k, v, o, up, gate, down, attn, ffn). ``ModuleMap`` is that translation for one ``AdapterModel``,
built from its resolved sites (``sites.py``), so every architecture of the site table is covered
without a table of its own. A fused projection (GPT-2's ``c_attn``) is one name for three positions,
each with its rows of the output (``sites.Part``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..kinds import POSITIONS
from ..sites import Part

if TYPE_CHECKING:
    from ..model import AdapterModel


class InteropError(ValueError):
    """A foreign checkpoint that cannot be converted exactly; the message names the option or tensor."""


@dataclass(frozen=True)
class Target:
    """One position of one layer: the module there (its name in the base model) and, for a fused
    projection, the rows of its output that the position owns."""

    layer: int
    position: str
    module: str
    part: Part | None = None


class ModuleMap:
    """Module names of ``model.base`` <-> adapterkit's (layer, position), for the projection positions."""

    def __init__(self, model: AdapterModel):
        base = model.base
        names = {id(m): n for n, m in base.named_modules()}
        self.prefix = getattr(base, "base_model_prefix", "") or ""
        self.by_module: dict[str, list[Target]] = {}
        self.by_site: dict[tuple[int, str], Target] = {}
        for ls in model.layer_sites:
            for position, where in POSITIONS.items():
                if where.acts_on != "output":
                    continue  # IA3's "ff" shares the module of "down" (see ``module_of``); "prefix" has none
                module = getattr(ls, where.output, None)
                if module is None or id(module) not in names:
                    continue
                target = Target(ls.index, position, names[id(module)], ls.parts.get(where.output))
                self.by_site[(ls.index, position)] = target
                self.by_module.setdefault(target.module, []).append(target)
        # norms: (layer, index in LayerSites.norms) by module name
        self.norms: dict[str, tuple[int, int]] = {}
        for ls in model.layer_sites:
            for j, (_, norm) in enumerate(ls.norms):
                if id(norm) in names:
                    self.norms[names[id(norm)]] = (ls.index, j)

    def local(self, foreign: str) -> str | None:
        """The name in ``model.base`` of a module another library named ``foreign`` (relative to the
        model it wrapped), or None. That model may have been the bare backbone or one with a task head
        around it (``bert.encoder...`` vs ``encoder...``), whichever ours is."""
        known = self.by_module.keys() | self.norms.keys()
        if foreign in known:
            return foreign
        if self.prefix and foreign.startswith(self.prefix + "."):
            stripped = foreign[len(self.prefix) + 1:]
            if stripped in known:
                return stripped
        if self.prefix and f"{self.prefix}.{foreign}" in known:
            return f"{self.prefix}.{foreign}"
        return None

    def targets(self, foreign: str) -> list[Target]:
        """The positions the module ``foreign`` serves (three for a fused q/k/v projection)."""
        local = self.local(foreign)
        return list(self.by_module.get(local, [])) if local is not None else []

    def module_of(self, layer: int, position: str) -> Target | None:
        """The module at (layer, position); IA3's ``ff`` is the FFN's output projection (its input)."""
        return self.by_site.get((layer, "down" if position == "ff" else position))

