"""LoRA, IA3 and mixed-kind batches: adapterkit beside PEFT, on the real MiniLM (or a BERT-base shape).

Run in .venv-compare (scripts/setup-compare.sh): ``.venv-compare/bin/python benchmarks/kinds_compare.py
--quick --json out/kinds_compare.json``. Keys ``<model>_<measure>_<library>``:

- ``lora_overhead``: latency with one LoRA (r 8, alpha 16, q+v) / the bare model, batch 32x128.
- ``ia3_overhead``: the same for IA3 on keys, values and the FFN activation.
- ``lora_mixed64_ratio``: 64 rows, each its own LoRA: throughput relative to one LoRA on the whole batch
  (adapterkit per-row routing; PEFT ``adapter_names``).
- ``lora_mixed8x32_ratio``: 8 LoRAs, 32 rows each, rows interleaved.
- ``kinds_mixed_ratio``: 64 rows over 8 adapters of 4 kinds (houlsby, pfeiffer, lora, ia3) and 3 sizes
  vs one Houlsby adapter on the whole batch (adapterkit only: no other library mixes kinds).

Ratios are medians of per-round ratios with the variants interleaved (the machine is shared), with
their spread (max - min). ``--quick``: fewer rounds and shorter sequences (see ``--tokens``).
``--clock cpu`` times this process's CPU seconds instead of wall time: on a machine other jobs load,
waiting for a core then counts for nothing (use it with ``--threads 1``, so that no thread spins).

``--device cuda --dtype bfloat16`` runs it on a GPU (``harness.py``: models and inputs on the device,
timings wait for it); ``--models minilm_shape`` is MiniLM's shape, randomly initialised, where the
MiniLM wheel is not installed. Needs peft (0.21.2 for the documented numbers).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys

import peft
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import harness  # noqa: E402
from harness import interleaved, load_base, median, perturb, random_ids, ratio_stats  # noqa: E402

from adapterkit import AdapterConfig, AdapterModel  # noqa: E402

LORA = dict(bottleneck_size=8, alpha=16, targets=["q", "v"])
IA3_TARGETS = r".*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)$"
IA3_FF = r".*layer\.\d+\.output\.dense$"


def build(which: str, tasks: int):
    bare = load_base(which)
    ak = AdapterModel(copy.deepcopy(bare)).eval()
    names = [f"t{k}" for k in range(tasks)]
    for n in names:
        ak.add_adapter(n, AdapterConfig("lora", **LORA))
    ak.add_adapter("ia3", AdapterConfig("ia3"))
    mixed_kinds = {"h16": AdapterConfig("houlsby", reduction_factor=16), "h32": AdapterConfig("houlsby", reduction_factor=32),
                   "p16": AdapterConfig("pfeiffer", reduction_factor=16), "l8": AdapterConfig("lora", **LORA),
                   "l64": AdapterConfig("lora", bottleneck_size=64, targets=["q", "k", "v", "o"]),
                   "l4": AdapterConfig("lora", bottleneck_size=4, targets=["q", "v", "up", "down"]),
                   "ia3b": AdapterConfig("ia3"), "p32": AdapterConfig("pfeiffer", reduction_factor=32)}
    for n, cfg in mixed_kinds.items():
        ak.add_adapter(n, cfg)
    perturb(list(ak.adapters.parameters()), 1)

    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    pf = peft.get_peft_model(copy.deepcopy(bare), lora, adapter_name=names[0])
    for n in names[1:]:
        pf.add_adapter(n, lora)
    perturb([p for n, p in pf.named_parameters() if "lora_" in n], 2)
    pf.eval()
    ia3 = peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF)
    pf_ia3 = peft.get_peft_model(copy.deepcopy(bare), ia3).eval()
    return bare, ak, pf, pf_ia3, names, list(mixed_kinds)


def run(which: str, rounds: int, tokens: int) -> dict[str, float]:
    bare, ak, pf, pf_ia3, names, kinds = build(which, 64)
    out: dict[str, float] = {}

    def hidden(model, ids, **kw):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).last_hidden_state

    ids = random_ids(32, tokens, bare.config.vocab_size, 0)
    pf.set_adapter(names[0])
    t = interleaved({
        "base": lambda: hidden(bare, ids),
        "lora_adapterkit": lambda: hidden(ak, ids, adapter_names=names[0]),
        "lora_peft": lambda: hidden(pf, ids),
        "ia3_adapterkit": lambda: hidden(ak, ids, adapter_names="ia3"),
        "ia3_peft": lambda: hidden(pf_ia3, ids),
    }, rounds)
    out[f"{which}_base_latency_ms"] = 1000 * median(t["base"])
    for key in ("lora_adapterkit", "lora_peft", "ia3_adapterkit", "ia3_peft"):
        kind, lib = key.split("_")
        out[f"{which}_{kind}_overhead_{lib}"], out[f"{which}_{kind}_overhead_spread_{lib}"] = ratio_stats(t[key], t["base"])

    ids = random_ids(64, tokens, bare.config.vocab_size, 1)
    each = names  # 64 rows, each its own LoRA
    by8 = [names[i % 8] for i in range(256)]  # 8 LoRAs x 32 rows, interleaved
    ids256 = random_ids(256, tokens, bare.config.vocab_size, 2)
    kinds64 = [kinds[i % len(kinds)] for i in range(64)]
    t = interleaved({
        "single_ak": lambda: hidden(ak, ids, adapter_names=names[0]),
        "mixed64_ak": lambda: hidden(ak, ids, adapter_names=each),
        "single_pf": lambda: hidden(pf, ids),
        "mixed64_pf": lambda: hidden(pf, ids, adapter_names=each),
        "houlsby": lambda: hidden(ak, ids, adapter_names="h16"),
        "kinds": lambda: hidden(ak, ids, adapter_names=kinds64),
    }, rounds)
    for lib, short in (("adapterkit", "ak"), ("peft", "pf")):
        r, s = ratio_stats(t[f"single_{short}"], t[f"mixed64_{short}"])
        out[f"{which}_lora_mixed64_ratio_{lib}"], out[f"{which}_lora_mixed64_ratio_spread_{lib}"] = r, s
    out[f"{which}_kinds_mixed_ratio_adapterkit"], out[f"{which}_kinds_mixed_ratio_spread_adapterkit"] = ratio_stats(t["houlsby"], t["kinds"])
    t = interleaved({
        "single_ak": lambda: hidden(ak, ids256, adapter_names=names[0]),
        "mixed_ak": lambda: hidden(ak, ids256, adapter_names=by8),
        "single_pf": lambda: hidden(pf, ids256),
        "mixed_pf": lambda: hidden(pf, ids256, adapter_names=by8),
    }, max(3, rounds // 2))
    for lib, short in (("adapterkit", "ak"), ("peft", "pf")):
        r, s = ratio_stats(t[f"single_{short}"], t[f"mixed_{short}"])
        out[f"{which}_lora_mixed8x32_ratio_{lib}"], out[f"{which}_lora_mixed8x32_ratio_spread_{lib}"] = r, s

    # correctness alongside speed: a mixed LoRA row equals that row alone
    with torch.inference_mode():
        mixed = hidden(ak, ids[:4], adapter_names=each[:4])
        out[f"{which}_lora_mixed_maxdiff_adapterkit"] = max(
            (mixed[i] - hidden(ak, ids[i : i + 1], adapter_names=each[i])[0]).abs().max().item() for i in range(4))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="MiniLM only, 7 rounds, 32 tokens")
    p.add_argument("--models", default=None, help="minilm,bertbase (default: minilm; both without --quick)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--tokens", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time, or this process's CPU time")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=tuple(harness.DTYPES), help="the base models' dtype")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    harness.use_device(args.device, args.dtype, args.clock)
    models = (args.models or ("minilm" if args.quick else "minilm,bertbase")).split(",")
    rounds = args.rounds or (7 if args.quick else 15)
    tokens = args.tokens or (32 if args.quick else 128)
    results: dict[str, float | str] = {"rounds": rounds, "tokens": tokens, "threads": args.threads, "clock": args.clock,
                                       **harness.describe(), "torch": torch.__version__, "peft": peft.__version__}
    for which in models:
        results.update(run(which, rounds, tokens))
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        from adapterkit.atomic_io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
