"""Where a batch mixing kinds loses at the serving shape: each kind alone and mixed within itself, beside
the four kinds mixed, all relative to one Houlsby adapter on the whole batch.

    python benchmarks/serving_kinds.py --rounds 15 --threads 1 --clock cpu

The shape is overhead.py's serving one (16 rows x 24 tokens; 16 adapters, four of each kind: Houlsby,
Pfeiffer, LoRA r 8 on q and v, IA3). Variants: ``<kind>1`` (one adapter of that kind on every row),
``<kind>_mix`` (each row drawn over that kind's four adapters), ``kinds_mix`` (each row over all 16),
``none`` (no adapter). Printed: CPU or wall ms a call (median of rounds) and the throughput ratio to
``houlsby1`` (median of per-round ratios, with their spread). Run it with and without
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` to see what fresh-buffer page
faults cost on a machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys

import torch

from adapterkit import AdapterConfig, AdapterModel

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import harness  # noqa: E402

KINDS = (AdapterConfig("houlsby", reduction_factor=16), AdapterConfig("pfeiffer", reduction_factor=16),
         AdapterConfig("lora", bottleneck_size=8, alpha=16), AdapterConfig("ia3"))
NAMES = ("houlsby", "pfeiffer", "lora", "ia3")  # adapter k{i} is of kind NAMES[i % 4]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=harness.MODELS)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="wall", choices=sorted(harness.CLOCKS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    harness.use_device(clock=args.clock)
    model = AdapterModel(harness.load_base(args.model)).eval()
    for k in range(16):
        model.add_adapter(f"k{k}", KINDS[k % 4])
    harness.perturb(list(model.adapters.parameters()), 0)
    ids = torch.randint(1000, model.base.config.vocab_size - 1, (16, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    draw = random.Random(1)

    def call(pick):
        def run():
            model(input_ids=ids, attention_mask=mask, adapter_names=pick())
        return run

    variants = {f"{name}1": call(lambda i=i: f"k{i}") for i, name in enumerate(NAMES)}
    variants["none"] = call(lambda: None)
    for i, name in enumerate(NAMES):
        variants[f"{name}_mix"] = call(lambda i=i: [f"k{4 * draw.randrange(4) + i}" for _ in range(16)])
    variants["kinds_mix"] = call(lambda: [f"k{draw.randrange(16)}" for _ in range(16)])
    times = harness.interleaved(variants, args.rounds)
    print(f"{'variant':14s}{'ms':>8s}{'vs houlsby1':>13s}{'spread':>8s}   ({args.clock} clock, {args.rounds} rounds)")
    for name, ts in times.items():
        ratio, spread = harness.ratio_stats(times["houlsby1"], ts)
        print(f"{name:14s}{1000 * harness.median(ts):8.1f}{ratio:13.3f}{spread:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
