"""Inference overhead of adapters, and the cost of mixed-task batches, measured side by side.

    python benchmarks/overhead.py --quick --json out/overhead.json   # MiniLM only, < 90 s on 2 cores
    python benchmarks/overhead.py --json out/overhead.json           # + a BERT-base-sized random model
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --model minilm_shape   # on a GPU

Every ratio compares variants timed in one run, interleaved (A B C A B C ... with the order rotated
each round) so that drift of a shared machine cancels; each number is a median over rounds.
- ``*_overhead_ratio``: latency with one adapter of that kind (rf 16) / latency of the bare base model,
  batch 32 x 128, inference mode.
- ``mixed{8,64}_vs_single_ratio``: throughput of a 64-row batch whose rows are spread at random over 8
  adapters (or each row its own of 64) / throughput of the same batch on one adapter.
- ``mixed{8,64}_max_abs_diff``: max |mixed row - that row run alone with its adapter|.
- ``serving_mixed_vs_single_ratio``: a serving shape, 16 rows x 24 tokens, each call's rows drawn
  afresh over 16 of the 64 adapters (no two calls route alike) / the same batch on one adapter. Here
  per-call work (routing, gathers) weighs most, as the compute per call is small.
- ``serving_kinds_vs_single_ratio``: the same serving shape, each call's rows drawn over 16 adapters of
  four kinds (Houlsby, Pfeiffer, LoRA r 8 on q and v, IA3), routed through the kind registry / the same
  batch on one Houlsby adapter.
- ``load_ms_with_{1,64}_loaded``: time to load one artifact into a model holding 1 or 64 adapters.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from adapterkit import AdapterConfig, AdapterModel

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import harness  # noqa: E402
from harness import load_base  # noqa: E402


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per variant (``harness.interleaved``: rotating order, one warm-up each)."""
    return {n: statistics.median(v) for n, v in harness.interleaved(variants, rounds).items()}


def perturb(model: AdapterModel, seed: int) -> None:
    """Adapters far from their init, so that a routing error would show in max_abs_diff."""
    harness.perturb(list(model.adapters.parameters()), seed)


def bench_model(which: str, rounds: int, quick: bool) -> dict[str, float]:
    base = load_base(which)
    model = AdapterModel(base)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    on_device = harness.device()
    ids = torch.randint(1000, vocab - 1, (32, 128), generator=g).to(on_device)
    for kind in ("houlsby", "pfeiffer", "parallel"):
        model.add_adapter(kind, AdapterConfig(kind, reduction_factor=16))
    for k in range(64):
        model.add_adapter(f"t{k}", AdapterConfig("houlsby", reduction_factor=16))
    serving_kinds = (AdapterConfig("houlsby", reduction_factor=16), AdapterConfig("pfeiffer", reduction_factor=16),
                     AdapterConfig("lora", bottleneck_size=8, alpha=16), AdapterConfig("ia3"))
    for k in range(16):
        model.add_adapter(f"k{k}", serving_kinds[k % 4])
    perturb(model, 0)

    def forward(batch_ids, names):
        def run():
            with torch.inference_mode():
                model(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids), adapter_names=names)

        return run

    out: dict[str, float] = {}
    t = interleaved(
        {"base": forward(ids, None), **{k: forward(ids, k) for k in ("houlsby", "pfeiffer", "parallel")}}, rounds
    )
    for kind in ("houlsby", "pfeiffer", "parallel"):
        out[f"{kind}_overhead_ratio"] = t[kind] / t["base"]
    out["base_latency_ms"] = 1000 * t["base"]

    rng = random.Random(0)
    ids64 = torch.randint(1000, vocab - 1, (64, 128), generator=g).to(on_device)
    names8 = [f"t{rng.randrange(8)}" for _ in range(64)]
    names64 = [f"t{k}" for k in range(64)]
    rng.shuffle(names64)
    t = interleaved(
        {"single": forward(ids64, "t0"), "mixed8": forward(ids64, names8), "mixed64": forward(ids64, names64)},
        rounds,
    )
    out["mixed8_vs_single_ratio"] = t["single"] / t["mixed8"]  # throughput ratio
    out["mixed64_vs_single_ratio"] = t["single"] / t["mixed64"]
    out["single_batch64_ms"] = 1000 * t["single"]

    ids16 = torch.randint(1000, vocab - 1, (16, 24), generator=g).to(on_device)
    draw = random.Random(1)

    def serving_mixed():
        names = [f"t{draw.randrange(16)}" for _ in range(16)]
        forward(ids16, names)()

    def serving_kinds():
        names = [f"k{draw.randrange(16)}" for _ in range(16)]
        forward(ids16, names)()

    t = interleaved({"single": forward(ids16, "t0"), "mixed": serving_mixed, "kinds": serving_kinds}, 4 * rounds)
    out["serving_mixed_vs_single_ratio"] = t["single"] / t["mixed"]
    out["serving_kinds_vs_single_ratio"] = t["single"] / t["kinds"]
    out["serving_single_ms"] = 1000 * t["single"]
    for k in range(16):  # the rest measures the model as before this shape existed
        model.delete_adapter(f"k{k}")

    # Correctness: each mixed row against that row alone (a sample of rows in quick runs).
    rows = range(0, 64, 8) if quick or which == "bertbase" else range(64)
    m1 = torch.ones(1, 128, dtype=torch.long, device=on_device)
    with torch.inference_mode():
        for key, names in (("mixed8", names8), ("mixed64", names64)):
            mixed = model(input_ids=ids64, attention_mask=torch.ones_like(ids64), adapter_names=names).last_hidden_state
            diff = 0.0
            for i in rows:
                alone = model(input_ids=ids64[i : i + 1], attention_mask=m1, adapter_names=names[i]).last_hidden_state
                diff = max(diff, (mixed[i] - alone[0]).abs().max().item())
            out[f"{key}_max_abs_diff"] = diff

    # Loading costs time in proportion to the adapter, not to how many are loaded already.
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_adapter("t0", pathlib.Path(tmp) / "t0.safetensors")

        def load_ms() -> float:
            samples = []
            for k in range(5):
                t0 = time.perf_counter()
                model.load_adapter(path, name=f"load{k}")
                samples.append(time.perf_counter() - t0)
                model.delete_adapter(f"load{k}")
            return 1000 * statistics.median(samples)

        out["load_ms_with_64_loaded"] = load_ms()
        for name in model.list_adapters()[1:]:
            model.delete_adapter(name)
        out["load_ms_with_1_loaded"] = load_ms()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM only, fewer rounds (< 90 s on 2 cores)")
    parser.add_argument("--json", type=pathlib.Path, help="write the results as one flat JSON object")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=tuple(harness.DTYPES), help="the base model's dtype")
    parser.add_argument("--clock", choices=tuple(harness.CLOCKS), default="wall",
                        help="time the inference rounds in wall time, or in this process's CPU time")
    parser.add_argument("--model", default="minilm", choices=("minilm", "minilm_shape"),
                        help="minilm_shape: MiniLM's shape, randomly initialised (where its wheel is not installed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    harness.use_device(args.device, args.dtype, args.clock)
    results: dict[str, float | str] = {"threads": args.threads, "clock": args.clock, "torch": torch.__version__,
                                       **harness.describe()}
    started = time.time()
    results.update(bench_model(args.model, args.rounds or (5 if args.quick else 9), args.quick))
    if not args.quick:
        bert = bench_model("bertbase", args.rounds or 5, args.quick)
        results.update({f"bertbase_{k}": v for k, v in bert.items()})
    results["seconds"] = time.time() - started
    width = max(len(k) for k in results)
    for k, v in results.items():
        shown = (f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}") if isinstance(v, float) else v
        print(f"{k:<{width}}  {shown}")
    targets = {"houlsby_overhead_ratio": ("<=", 1.05), "pfeiffer_overhead_ratio": ("<=", 1.05),
               "parallel_overhead_ratio": ("<=", 1.05), "mixed8_vs_single_ratio": (">=", 0.95),
               "mixed64_vs_single_ratio": (">=", 0.90), "serving_mixed_vs_single_ratio": (">=", 0.95),
               "serving_kinds_vs_single_ratio": (">=", 0.95)}
    for prefix in ("", "bertbase_"):
        for key, (op, bound) in targets.items():
            if prefix + key in results:
                v = results[prefix + key]
                ok = v <= bound if op == "<=" else v >= bound
                print(f"target {prefix + key} {op} {bound}: {'met' if ok else 'MISSED'} ({v:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
