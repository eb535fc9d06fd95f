"""Where a mixed-task forward spends its time beside a one-adapter forward: adapterkit's hooks, timed.

    .venv/bin/python benchmarks/profile_mixed.py                       # MiniLM, 64 x 128, 64 adapters
    .venv/bin/python benchmarks/profile_mixed.py --model bertbase      # BERT-base-sized, random weights
    .venv/bin/python benchmarks/profile_mixed.py --rows 18 --tokens 24 --tasks 16 --threads 1   # serving

Wraps the three places routing runs per forward (adapter sites, their weight gathers, layer norms)
with wall-clock timers and prints milliseconds per forward for one adapter on the whole batch and for
rows spread over ``--tasks`` adapters; then times ``F.layer_norm`` with and without weights at the
batch's shape (the mixed path keeps the norm's own weighted kernel, the faster one on CPU).
A profile, not a benchmark: timers add overhead, and the run is short; compare columns, not runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from overhead import load_base

from adapterkit import AdapterConfig, AdapterModel, attach, routing


def timed(owner: type, name: str, totals: Counter, label: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "bertbase"), default="minilm")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--tasks", type=int, default=64, help="adapters the rows are spread over")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = AdapterModel(load_base(args.model)).eval()
    names = [f"t{k}" for k in range(args.tasks)]
    for name in names:
        model.add_adapter(name, AdapterConfig("houlsby", reduction_factor=16))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size - 1, (args.rows, args.tokens), generator=g)
    mask = torch.ones_like(ids)
    rng = random.Random(0)
    mixed_names = [names[i % args.tasks] for i in range(args.rows)]
    rng.shuffle(mixed_names)

    totals: Counter = Counter()
    timed(routing.Route, "apply_site", totals, "adapter sites (incl. gathers)")
    timed(routing.Route, "gather", totals, "weight gathers (sites and norms)")
    timed(attach.RoutedNorm, "__call__", totals, "layer norms (incl. gathers)")

    print(f"{args.model}, {args.rows} x {args.tokens}, {args.tasks} adapters, {args.threads} threads; ms per forward")
    rows: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for label, route in (("one adapter", names[0]), ("mixed", mixed_names)):
            def forward(route=route):
                model(input_ids=ids, attention_mask=mask, adapter_names=route)

            forward()
            totals.clear()
            total = median_ms(forward, args.repeats)
            rows[label] = {"whole forward": total, **{k: 1000 * v / (args.repeats + 1) for k, v in totals.items()}}
    parts = sorted({k for r in rows.values() for k in r}, key=lambda k: k != "whole forward")
    print(f"{'':34s}" + "".join(f"{label:>14s}" for label in rows))
    for part in parts:
        print(f"{part:34s}" + "".join(f"{r.get(part, 0.0):14.1f}" for r in rows.values()))

    d = model.hidden_size
    x = torch.randn(args.rows, args.tokens, d, generator=g)
    w, b = torch.ones(d), torch.zeros(d)
    with torch.inference_mode():
        with_w = median_ms(lambda: F.layer_norm(x, (d,), w, b), 20)
        without = median_ms(lambda: F.layer_norm(x, (d,)), 20)
    print(f"F.layer_norm on {tuple(x.shape)}: {with_w:.2f} ms with weights, {without:.2f} ms without")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
