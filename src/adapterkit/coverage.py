"""Which adapter kinds each architecture of the site table takes, and why not where it does not.

Derived, never listed by hand: LoRA / DoRA and IA3 targets from the projection roles a row of the site
table names (``sites.py``; a row whose FFN output is its FFN input module is a mixture of experts'
sparse block, no projection), prefix tuning from its own lists (``prefix.DECODERS`` ...,
``prefix.REFUSED``); the bottleneck kinds act on every row. ``docs/architectures.md`` is this module's
page (``python -m adapterkit.coverage`` writes it), and ``tests/core/test_every_kind.py`` checks
it against what every row's tiny model accepts and refuses.
"""

from __future__ import annotations

from pathlib import Path

from .kinds import POSITIONS, ia3, lora, prefix
from .sites import SITES, SiteSpec, architectures_markdown


def is_moe(spec: SiteSpec) -> bool:
    """Whether a row's FFN is one mixture-of-experts block: its output module is its input module."""
    return spec.ffn_out == spec.ffn_in


def _has(spec: SiteSpec, role: str) -> bool:
    """Whether a row names a projection for ``role`` (a fused one included)."""
    if role == "attn_out":
        return True
    if role == "ffn_out":
        return not is_moe(spec)
    fused = {"attn_q": spec.attn_qkv, "attn_k": spec.attn_qkv, "attn_v": spec.attn_qkv,
             "ffn_up": spec.ffn_gate_up, "ffn_gate": spec.ffn_gate_up}
    return bool(getattr(spec, role) or fused.get(role))


def targets(spec: SiteSpec) -> dict[str, tuple[str, ...]]:
    """Kind -> the targets a row names a projection for (``lora`` covers DoRA too)."""
    return {name: tuple(t for t in kind_targets if _has(spec, POSITIONS[t].output))
            for name, kind_targets in (("lora", lora.TARGETS), ("ia3", ia3.TARGETS))}


def prefix_support(model_type: str) -> tuple[bool, str]:
    """(taken, how or why not) for prefix tuning on one model type."""
    if model_type in prefix.DECODERS:
        return True, "the decoder stack's KV cache"
    if model_type in prefix.ENCODERS:
        return True, "each self-attention"
    if model_type in prefix.ENCODER_DECODERS:
        return True, "each self-attention (encoder and decoder)"
    return False, prefix.REFUSED.get(model_type, "untested")


def refusals(model_type: str) -> set[str]:
    """What ``add_adapter`` refuses on a row: ``"kind:target"`` (``dora`` for LoRA with ``dora=True``),
    ``"prefix"``. A row naming a gate that only gated configs have (T5 v1.1's ``wi_0``) counts as having it."""
    spec = SITES[model_type]
    taken = targets(spec)
    out = {f"{kind}:{t}" for kind, kind_targets in (("lora", lora.TARGETS), ("dora", lora.TARGETS), ("ia3", ia3.TARGETS))
           for t in kind_targets if t not in taken["ia3" if kind == "ia3" else "lora"]}
    if not prefix_support(model_type)[0]:
        out.add("prefix")
    return out


def _fused_note(spec: SiteSpec) -> str:
    notes = []
    if spec.attn_qkv:
        groups = spec.qkv_groups
        layout = ("[q; k; v]" if groups == 1 and spec.qkv_order == "qkv" else
                  "interleaved per key/value head" if groups == "kv_heads" else
                  f"{groups} blocks of [{'; '.join(spec.qkv_order)}]")
        notes.append(f"q, k, v: rows of {' / '.join(f'`{n}`' for n in spec.attn_qkv)} ({layout})")
    if spec.ffn_gate_up:
        notes.append(f"gate, up: halves of {' / '.join(f'`{n}`' for n in spec.ffn_gate_up)}")
    return "; ".join(notes)


def kinds_markdown() -> str:
    """The kinds section of docs/architectures.md: a row per model type, then each gap and its reason."""
    lines = [
        "## Kinds per architecture",
        "",
        "The bottleneck kinds (`houlsby`, `pfeiffer`, `parallel`, `serial_attention`) act on every row. LoRA and",
        "DoRA act on the projections a row names, IA3 on its keys, values and FFN activation, prefix tuning where",
        "its hooks are tested. Generated from the table and the kinds' own lists (`adapterkit.coverage`);",
        "`tests/core/test_every_kind.py` adds every kind and every target alone on each row's tiny model under",
        "both transformers versions: what is refused is exactly what is listed here, and one adapter of every",
        "kind a row takes shares one batch with the others (each row equals that row alone, to 1e-5).",
        "",
        "| model_type | LoRA / DoRA targets | IA3 targets | prefix tuning | fused projections |",
        "|---|---|---|---|---|",
    ]
    for model_type in sorted(SITES):
        spec = SITES[model_type]
        taken = targets(spec)
        ok, how = prefix_support(model_type)
        lines.append(f"| {model_type} | {' '.join(taken['lora'])} | {' '.join(taken['ia3'])} | "
                     f"{how if ok else '–'} | {_fused_note(spec)} |")
    moe = sorted(t for t, s in SITES.items() if is_moe(s))
    ungated = sorted(t for t, s in SITES.items() if not (s.ffn_gate or s.ffn_gate_up))
    lines += [
        "",
        "### Not taken, and why",
        "",
        f"- **LoRA / DoRA `gate`** where the FFN is not gated: {', '.join(ungated)}. T5's row names T5 v1.1's",
        "  gate (`wi_0`, mT5 and umT5 too); plain T5 and LongT5 configs have none, and say so when targeted.",
        f"- **LoRA / DoRA `up`, `gate`, `down` and IA3 `ff`** on mixtures of experts ({', '.join(moe)}): the FFN is",
        "  one sparse block that sends each token through its own experts' projections, none of them the FFN's.",
        "  Bottleneck adapters act on the block's output, LoRA and IA3 on the attention.",
        "- **Cross-attention** of encoder-decoders (T5, BART families): no kind targets it yet (the table has no",
        "  cross-attention roles).",
        "- **Prefix tuning**:",
    ]
    lines += [f"  - **{t}**: {why}." for t, (ok, why) in sorted((t, prefix_support(t)) for t in SITES) if not ok]
    return "\n".join(lines) + "\n"


def architectures_page() -> str:
    """docs/architectures.md: the site table (``sites.architectures_markdown``), then the kinds section."""
    return architectures_markdown() + "\n" + kinds_markdown()


if __name__ == "__main__":
    from .atomic_io import atomic_write_text

    target = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
    atomic_write_text(target, architectures_page())
    print(f"wrote {target}")
