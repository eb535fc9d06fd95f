"""What a run is asked to do (``TrainConfig``), what it gives back (``TrainResult``), and where its files go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model import ParameterReport

METRICS = ("accuracy", "macro_f1")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The best of benchmarks/quality.py's learning-rate sweep, chosen on validation (TREC, 500 examples,
# 3 epochs, seed 0): adapters 3e-3 (of 3e-4 / 1e-3 / 3e-3: validation accuracy 33 / 63 / 88), full
# fine-tuning 2e-4 (5e-5 / 1e-4 / 2e-4: 49 / 85.5 / 88; 5e-5 left it far under-trained). Rerun the
# sweep at full size, with more seeds, before moving these again.
DEFAULT_LR = {"adapter": 3e-3, "full": 2e-4}


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT / SIGTERM after writing a checkpoint; ``resume=True`` continues it."""


@dataclass
class TrainConfig:
    """How to train. ``lr=None`` picks ``DEFAULT_LR`` for adapters or for full fine-tuning.

    ``batch_size`` is the global batch: under DDP each of N processes takes ``batch_size / N`` rows.
    ``checkpoint_steps``: also checkpoint every that many optimizer steps (0: only at epoch ends).
    ``progress``: report on the way: a bar per epoch when stderr is a terminal, else one line per
    epoch; ``False`` prints nothing. ``keep_checkpoints``: keep the last checkpoint after a successful
    run (the command line passes ``False`` unless ``--keep-checkpoints``).
    """

    epochs: int = 3
    lr: float | None = None
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = 128
    eval_batch_size: int = 64
    seed: int = 0
    full: bool = False
    metric: str = "accuracy"
    device: str | None = None
    dtype: str | None = None
    checkpoint_steps: int = 100
    progress: bool = True
    keep_checkpoints: bool = True
    # AdapterDrop (Rücklé et al. 2021), stochastic: each step runs without adapters in the lowest k
    # layers, k drawn uniformly from 0..adapter_drop (from the seed and the step: the same on every
    # process and after a resume); 0: off. For a fixed drop, give the adapter leave_out instead.
    adapter_drop: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        for key in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1; got {getattr(self, key)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if isinstance(self.adapter_drop, bool) or not isinstance(self.adapter_drop, int) or self.adapter_drop < 0:
            raise ValueError(f"adapter_drop must be a layer count >= 0; got {self.adapter_drop!r}")
        if self.adapter_drop and self.full:
            raise ValueError("adapter_drop drops adapters; full fine-tuning (full=True) trains every layer")
        if self.checkpoint_steps < 0:
            raise ValueError(f"checkpoint_steps must be >= 0; got {self.checkpoint_steps}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR["full" if self.full else "adapter"]


@dataclass
class TrainResult:
    """What a run produced. ``history`` holds one dict per evaluation (as in the JSON Lines log);
    ``metric`` names the validation score that chose the best epoch (``val_accuracy``...)."""

    artifact: Path
    best_metric: float
    best_epoch: int
    history: list[dict[str, Any]]
    parameters: ParameterReport
    epoch_seconds: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    metric: str = "val_accuracy"


def run_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files a run writes next to its artifact ``out``."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    return {
        "artifact": out,
        "log": stem.with_name(stem.name + ".log.jsonl"),
        "plot": stem.with_name(stem.name + ".png"),
        "checkpoint": stem.with_name(stem.name + ".ckpt"),
        "base": stem.with_name(stem.name + ".base.safetensors"),
    }
