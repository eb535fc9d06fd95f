"""Every architecture of the site table x every adapter kind, on tiny random models.

Per architecture: each kind is added, and each LoRA, DoRA and IA3 target alone; what is refused must be
exactly what ``expected_refusals`` lists, each message naming its reason (so a new refusal fails, and
so does a gap that closes while still listed). Then one adapter of every kind the architecture takes
(LoRA and DoRA on every target it has, IA3 on every target it has, prefix tuning where it works, the
four bottleneck kinds), moved away from the identity, share one batch with a row of no adapter: each
row equals the batch run under that row's adapter alone (max abs diff <= 1e-5), and each adapter
changes its row. Two exact checks that the roles are what they say, on every architecture: IA3 scaling
v by zero zeroes every self-attention's output (so the v rows are the values), and with k scaled by
zero, noise added to the q rows changes nothing (queries then meet only zero keys: so the q rows are
queries and the k rows all of the keys). ``docs/architectures.md``'s kinds section lists these same
refusals (``adapterkit.coverage``; checked here against this table).
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import TINY, VISION, tiny_inputs, tiny_model

from adapterkit import SITES, AdapterConfig, AdapterModel, coverage
from adapterkit.kinds import KINDS
from adapterkit.kinds import ia3 as ia3_kind
from adapterkit.kinds import lora as lora_kind

TOL = 1e-5
BOTTLENECKS = {k: AdapterConfig(k, bottleneck_size=3) for k in ("houlsby", "pfeiffer", "parallel", "serial_attention")}
PREFIX = AdapterConfig("prefix", bottleneck_size=3, init_std=0.5)  # 3 + 5 tokens: GPT-Neo's local window of 8

# -- what is refused, where, and the reason its message gives ----------------------------------------
GATED = {  # FFNs with a gate projection (the others: no LoRA / DoRA "gate" target)
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "helium", "smollm3", "olmo",
    "olmo2", "phi3", "stablelm", "cohere", "mt5", "umt5", "modernbert",
}
MOE = {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}  # FFN = one sparse block: no up / gate / down / ff
NOT_GATED = "needs the ffn_gate projection, which the site table row"
MOE_BLOCK = "mixture-of-experts block"
_NO_CACHE = "self-attention takes no KV cache argument"
PREFIX_REFUSED = {
    "albert": _NO_CACHE, "deberta": _NO_CACHE, "deberta-v2": _NO_CACHE, "distilbert": _NO_CACHE, "mpnet": _NO_CACHE,
    "modernbert": _NO_CACHE, **{t: _NO_CACHE for t in VISION},
    "longt5": "local / transient-global attention takes no KV cache argument",
    "falcon": "4.57's Falcon caches its keys and values repeated for every query head",
}


def expected_refusals(model_type: str) -> dict[str, str]:
    """``"kind:target"`` (or ``"kind"``) -> the pattern its refusal must match, for one architecture."""
    out = {}
    if model_type not in GATED:
        out |= {"lora:gate": NOT_GATED, "dora:gate": NOT_GATED}
    if model_type in MOE:
        out |= {f"{k}:{t}": MOE_BLOCK for k in ("lora", "dora") for t in ("up", "gate", "down")} | {"ia3:ff": MOE_BLOCK}
    if model_type in PREFIX_REFUSED:
        out["prefix"] = PREFIX_REFUSED[model_type]
    return out


ARCHITECTURES = sorted(set(TINY) & set(SITES))


def _out(output) -> torch.Tensor:
    """The last hidden state (B, T, d), the decoder's for encoder-decoders: where adapters act, before an
    LM head (whose fixed map would scale rounding: mT5's logits reach 20)."""
    for name in ("decoder_hidden_states", "hidden_states"):
        states = getattr(output, name, None)
        if states is not None:
            return states[-1]
    return output.last_hidden_state


def _try(model: AdapterModel, name: str, config: AdapterConfig, refused: dict[str, str], key: str, keep: bool) -> bool:
    """Add an adapter; a ValueError is recorded under ``key``. Without ``keep`` it is deleted again."""
    try:
        model.add_adapter(name, config)
    except ValueError as e:
        refused[key] = str(e)
        return False
    if not keep:
        model.delete_adapter(name)
    return True


def _every_kind(model: AdapterModel) -> tuple[list[str], dict[str, str]]:
    """Add one adapter of every kind the model takes (each target tried alone first); returns the
    adapters' names and the refusals by ``kind:target``."""
    refused: dict[str, str] = {}
    names = []
    for name, config in BOTTLENECKS.items():
        if _try(model, name, config, refused, name, keep=True):
            names.append(name)
    for name, targets, make in (
        ("lora", lora_kind.TARGETS, lambda t: AdapterConfig("lora", bottleneck_size=4, alpha=8, targets=t)),
        ("dora", lora_kind.TARGETS, lambda t: AdapterConfig("lora", bottleneck_size=3, targets=t, dora=True)),
        ("ia3", ia3_kind.TARGETS, lambda t: AdapterConfig("ia3", targets=t)),
    ):
        taken = [t for t in targets if _try(model, name, make([t]), refused, f"{name}:{t}", keep=False)]
        if taken:
            model.add_adapter(name, make(taken))
            names.append(name)
    if _try(model, "prefix", PREFIX, refused, "prefix", keep=True):
        names.append("prefix")
    return names, refused


def test_every_kind_is_covered():
    """A new kind must be added here (and its gaps to ``expected_refusals``)."""
    assert set(KINDS) == set(BOTTLENECKS) | {"lora", "ia3", "prefix"}
    assert not (GATED | MOE | set(PREFIX_REFUSED)) - set(ARCHITECTURES)  # no stale names


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_kind_on_every_architecture(model_type):
    model = AdapterModel(tiny_model(model_type)).eval()
    names, refused = _every_kind(model)
    expected = expected_refusals(model_type)
    assert sorted(refused) == sorted(expected), {k: refused.get(k, "(taken)") for k in set(refused) ^ set(expected)}
    for key, pattern in expected.items():
        assert pattern in refused[key], (key, refused[key])
    # the documented matrix says the same (it counts a gate the row names as there: T5 v1.1's, not plain T5's)
    assert coverage.refusals(model_type) == set(expected) - ({"lora:gate", "dora:gate"} if SITES[model_type].ffn_gate else set())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the identity (LoRA's B and the bottlenecks' up start at zero)
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)

    rows = [*names, None]
    inputs = dict(tiny_inputs(model_type, batch=len(rows), seq=5), output_hidden_states=True)
    with torch.no_grad():
        bare = _out(model.base(**inputs))
        assert torch.equal(_out(model(**inputs)), bare)  # nothing routed: bit-identical
        mixed = _out(model(**inputs, adapter_names=rows))
        # the outputs at real tokens (padding's are undefined: OPT numbers padded positions its own way,
        # a prefix's hook from 0 up); encoder-decoders' decoder inputs and images have no padding
        mask = inputs.get("attention_mask")
        real = mask.bool() if mask is not None and mask.shape == bare.shape[:2] else torch.ones(bare.shape[:2], dtype=torch.bool)
        for i, name in enumerate(rows):
            alone = bare if name is None else _out(model(**inputs, adapter_names=name))
            diff = (mixed[i] - alone[i])[real[i]].abs().max().item()
            assert diff <= TOL, (name, diff)
            if name is not None:
                assert (alone[i] - bare[i])[real[i]].abs().max() > 1e-4, name  # the adapter acts on its row
    _check_roles(model, inputs, bare)


def _check_roles(model: AdapterModel, inputs: dict, bare: torch.Tensor) -> None:
    """IA3 v = 0: every self-attention's output (the attention output projection's input) is exactly
    zero. IA3 k = 0: noise on the q rows (a hook after adapterkit's) changes nothing at all."""
    for role in ("v", "k"):
        zero = model.add_adapter(f"zero_{role}", AdapterConfig("ia3", targets=[role]))
        with torch.no_grad():
            for p in zero.parameters():
                p.zero_()
    seen: list[torch.Tensor] = []
    handles = [ls.attn_out.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for ls in model.layer_sites]
    with torch.no_grad():
        model(**inputs, adapter_names="zero_v")
    for h in handles:
        h.remove()
    assert seen and all(torch.count_nonzero(x) == 0 for x in seen), [float(x.abs().max()) for x in seen]

    def noisy_queries(part):
        def hook(module, args, out):
            noise = torch.full_like(out if part is None else part.take(out), 0.5)
            if part is None:
                return out + noise
            out = out.clone()
            part.put(out, part.take(out) + noise)
            return out
        return hook

    with torch.no_grad():
        keyless = _out(model(**inputs, adapter_names="zero_k"))
        handles = [ls.attn_q.register_forward_hook(noisy_queries(ls.parts.get("attn_q"))) for ls in model.layer_sites]
        try:
            assert torch.equal(_out(model(**inputs, adapter_names="zero_k")), keyless)
            assert not torch.equal(_out(model(**inputs)), bare)  # the noise does reach the queries
        finally:
            for h in handles:
                h.remove()
