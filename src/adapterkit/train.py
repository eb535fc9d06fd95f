"""Training one task: the Houlsby et al. recipe by default, full fine-tuning through the same loop.

    result = train(base="path/to/model", data="train.csv", task="sentiment", out="runs/sentiment.safetensors")

Recipe (``TrainConfig`` defaults): AdamW, linear warm-up over the first 10 % of steps then linear decay
to zero, batch 32, adapter + layer norms + head trained, everything seeded. Each epoch ends with an
evaluation on the validation split; the best one is kept as the artifact (written atomically by the
core). Next to the artifact ``OUT`` (``runs/sentiment.safetensors``):

- ``runs/sentiment.log.jsonl``: one JSON line per evaluation;
- ``runs/sentiment.png``: loss and metric curves;
- ``runs/sentiment.ckpt/``: the last checkpoint (adapter artifact + optimizer, scheduler, step and RNG
  state as safetensors + JSON; nothing is pickled), from which ``resume=True`` continues. SIGINT /
  SIGTERM stop the run after the current step with a fresh checkpoint; a hard kill loses at most the
  steps since the last one, never a file (every write is a temp file renamed into place).
- with ``full=True``, ``runs/sentiment.base.safetensors``: the fine-tuned base weights.

Distributed: under ``torchrun --nproc_per_node N`` (env ``WORLD_SIZE``) the process group starts here
(nccl on GPUs, gloo on CPU), the model is wrapped in DDP, each process takes ``batch_size / N`` rows
of every global batch (DistributedSampler), evaluation is sharded and reduced, and rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .artifact import read_artifact
from .config import AdapterConfig
from .data import EncodedTask, TaskData, load_task, stratified_split
from .model import AdapterModel, ParameterReport

METRICS = ("accuracy", "macro_f1")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LR = {"adapter": 1e-3, "full": 5e-5}


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT / SIGTERM after writing a checkpoint; ``resume=True`` continues it."""


@dataclass
class TrainConfig:
    """How to train. ``lr=None`` picks 1e-3 for adapters and 5e-5 for full fine-tuning.

    ``batch_size`` is the global batch: under DDP each of N processes takes ``batch_size / N`` rows.
    ``checkpoint_steps``: also checkpoint every that many optimizer steps (0: only at epoch ends).
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

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR["full" if self.full else "adapter"]


@dataclass
class TrainResult:
    """What a run produced. ``history`` holds one dict per evaluation (as in the JSON Lines log)."""

    artifact: Path
    best_metric: float
    best_epoch: int
    history: list[dict[str, Any]]
    parameters: ParameterReport
    epoch_seconds: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


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


# ---------------------------------------------------------------------------------------------
# Devices and processes
# ---------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str | None) -> _Dist:
    """Join the process group torchrun describes in the environment (nothing when WORLD_SIZE <= 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def pick_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """``device`` if given, else this process's GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, dist_state: _Dist) -> torch.Tensor:
    if dist_state.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _rng_states(dist_state: _Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's RNG states (the CPU generator; CUDA's too when training there), gathered so that
    rank 0's checkpoint can give each process its own dropout stream back on resume. Collective."""
    local = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, state in local.items():
        parts = [state]
        if dist_state.world > 1:
            import torch.distributed as dist

            mine = state.to(device)  # NCCL gathers device tensors, gloo CPU ones
            parts = [torch.empty_like(mine) for _ in range(dist_state.world)]
            dist.all_gather(parts, mine)
        for rank, part in enumerate(parts):
            out[f"rng.{kind}.rank{rank}"] = part.cpu()
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def metrics_from_confusion(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy and macro-F1 (over labels that occur in gold or predictions) from an (L, L) matrix
    whose rows are gold labels and columns predictions."""
    confusion = confusion.double()
    total = confusion.sum().item()
    tp = confusion.diag()
    gold, pred = confusion.sum(1), confusion.sum(0)
    present = (gold + pred) > 0
    f1 = torch.where(gold + pred > 0, 2 * tp / (gold + pred).clamp(min=1), torch.zeros_like(tp))
    return {
        "accuracy": tp.sum().item() / total if total else 0.0,
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
    }


@torch.no_grad()
def evaluate(
    model: AdapterModel,
    name: str,
    data: EncodedTask,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    _dist: _Dist | None = None,
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of adapter ``name`` on ``data`` (tokens with label -100 ignored).

    Under DDP each process takes every N-th example and the counts are summed across processes."""
    dist_state = _dist or _Dist()
    device = torch.device(device) if device is not None else model.device
    was_training = model.training
    model.eval()
    n_labels = len(data.labels)
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, count)
    shard = Subset(data, range(dist_state.rank, len(data), dist_state.world))
    for batch in DataLoader(shard, batch_size=batch_size, collate_fn=data.collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch, adapter_names=name).logits.float()  # (B, L) or (B, T, L)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        keep = flat_labels != -100
        flat_logits, flat_labels = flat_logits[keep], flat_labels[keep]
        loss_sum[0] += torch.nn.functional.cross_entropy(flat_logits, flat_labels, reduction="sum").double()
        loss_sum[1] += flat_labels.numel()
        pred = flat_logits.argmax(-1)
        confusion.index_put_((flat_labels, pred), torch.ones_like(pred, dtype=torch.float64), accumulate=True)
    _all_reduce(confusion, dist_state)
    _all_reduce(loss_sum, dist_state)
    model.train(was_training)
    out = metrics_from_confusion(confusion.cpu())
    out["loss"] = (loss_sum[0] / loss_sum[1].clamp(min=1)).item()
    return out


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoint, log, plot
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_json(path: Path, doc: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(doc, indent=1, sort_keys=True)))


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in doc["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in doc["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_checkpoint(
    folder: Path,
    model: AdapterModel,
    name: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    state: dict[str, Any],
    full: bool,
    rng: dict[str, torch.Tensor],
) -> None:
    """One checkpoint = a fresh ``step-N`` folder, then ``latest.json`` pointed at it (atomic rename),
    then older folders removed: a kill at any moment leaves the previous checkpoint usable."""
    folder.mkdir(parents=True, exist_ok=True)
    step_dir = folder / f"step-{state['step']:08d}"
    if step_dir.exists():
        shutil.rmtree(step_dir)
    step_dir.mkdir()
    model.save_adapter(name, step_dir / "adapter.safetensors")
    if full:
        base_state = {k: v.detach().cpu().contiguous() for k, v in model.base.state_dict().items()}
        _atomic_write(step_dir / "base.safetensors", lambda p: save_file(_unshare(base_state), str(p)))
    tensors, opt_doc = _optimizer_to_files(optimizer)
    tensors.update(rng)
    _atomic_write(step_dir / "trainer.safetensors", lambda p: save_file(tensors, str(p)))
    doc = dict(state)
    doc["optimizer"] = opt_doc
    doc["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    doc["python_random"] = _jsonable_random_state()
    _write_json(step_dir / "state.json", doc)
    _write_json(folder / "latest.json", {"dir": step_dir.name, "step": state["step"]})
    for old in folder.glob("step-*"):
        if old.name != step_dir.name:
            shutil.rmtree(old, ignore_errors=True)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give each key its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _jsonable_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _load_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    pointer = folder / "latest.json"
    if not pointer.exists():
        return None
    step_dir = folder / json.loads(pointer.read_text())["dir"]
    return step_dir, json.loads((step_dir / "state.json").read_text())


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    _atomic_write(path, lambda p: p.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history)))


def write_plot(path: Path, history: list[dict[str, Any]], metric: str, title: str = "") -> None:
    """PNG of training / validation loss and the validation metric against epochs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and safe in worker processes
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_metric.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", color="tab:green")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"validation {metric}")
    fig.suptitle(title)
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=80))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT / SIGTERM set a flag the loop checks between steps; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.set = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if hasattr(signal, "SIGTERM"):
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                self.previous = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _param_groups(model: AdapterModel, weight_decay: float) -> list[dict[str, Any]]:
    # decay matrices only: biases and norm scales / shifts keep their scale (the usual BERT recipe)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in n.lower() else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit(
    model: AdapterModel,
    name: str,
    train_data: TaskData | EncodedTask,
    validation_data: TaskData | EncodedTask,
    tokenizer: Any,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    description: str = "",
) -> TrainResult:
    """Train adapter ``name`` (already added to ``model``, with its head) and keep the best artifact.

    ``config.full`` trains the base model too. Returns the best validation metric and the history;
    afterwards the model holds the best weights. Raises TrainingInterrupted on SIGINT / SIGTERM (after
    a checkpoint), and ValueError when ``resume`` finds a checkpoint of a different run.
    """
    cfg = config or TrainConfig()
    dist_state = _init_distributed(cfg.device)
    try:
        return _fit(model, name, train_data, validation_data, tokenizer, Path(out), cfg, resume, description, dist_state)
    finally:
        if dist_state.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _fit(
    model: AdapterModel,
    name: str,
    train_data: TaskData | EncodedTask,
    validation_data: TaskData | EncodedTask,
    tokenizer: Any,
    out: Path,
    cfg: TrainConfig,
    resume: bool,
    description: str,
    dist_state: _Dist,
) -> TrainResult:
    paths = run_paths(out)
    device = pick_device(cfg.device, dist_state.local_rank)
    if cfg.batch_size % dist_state.world:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {dist_state.world} processes")
    model.to(device)
    if cfg.dtype is not None:
        model.base.to(DTYPES[cfg.dtype])
    report = model.train_full(name) if cfg.full else model.train_adapter(name)
    train_set = train_data if isinstance(train_data, EncodedTask) else EncodedTask(train_data, tokenizer, cfg.max_length)
    val_set = (
        validation_data if isinstance(validation_data, EncodedTask) else EncodedTask(validation_data, tokenizer, cfg.max_length)
    )
    per_process = cfg.batch_size // dist_state.world
    sampler = DistributedSampler(train_set, num_replicas=dist_state.world, rank=dist_state.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / per_process)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_schedule(max(1, round(cfg.warmup_ratio * total_steps)), total_steps)
    )
    # Same seed on every process for the parts that must agree; dropout differs per process.
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + dist_state.rank)
    fingerprint = {"train_size": len(train_set), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                   "world": dist_state.world, "full": cfg.full, "lr": cfg.learning_rate, "seed": cfg.seed}
    state: dict[str, Any] = {"step": 0, "epoch": 0, "skip": 0, "best": None, "best_epoch": 0, "history": [],
                             "epoch_seconds": [], "run": fingerprint, "loss_sum": 0.0, "loss_count": 0}
    if resume:
        found = _load_checkpoint(paths["checkpoint"])
        if found is not None:
            step_dir, saved = found
            if saved["run"] != fingerprint:
                raise ValueError(
                    f"{paths['checkpoint']}: checkpoint is from a different run ({saved['run']}); "
                    f"this run is {fingerprint}. Delete it or start without --resume"
                )
            adapter_tensors = read_artifact(step_dir / "adapter.safetensors").tensors or {}
            model.adapters[name].load_state_dict(adapter_tensors)
            if cfg.full:
                base = load_file(str(step_dir / "base.safetensors"))
                model.base.load_state_dict(base, strict=False)
            tensors = load_file(str(step_dir / "trainer.safetensors"))
            _optimizer_from_files(optimizer, tensors, saved["optimizer"])
            scheduler.load_state_dict({**saved["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
            mine = f"rng.torch.rank{dist_state.rank}"
            if mine in tensors:
                torch.set_rng_state(tensors[mine])
            elif dist_state.main and "rng.torch" in tensors:  # checkpoints before per-process states
                torch.set_rng_state(tensors["rng.torch"])
            if device.type == "cuda" and f"rng.cuda.rank{dist_state.rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{dist_state.rank}"], device)
            version, internal, gauss = saved["python_random"]
            random.setstate((version, tuple(internal), gauss))
            state.update({k: saved[k] for k in state})
            if dist_state.main and cfg.progress:
                print(f"resuming from {step_dir} (epoch {state['epoch'] + 1}, step {state['step']})", flush=True)
    wrapped: torch.nn.Module = model
    if dist_state.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.full,  # the base's pooler is never used by our heads
        )
    params = [p for p in model.parameters() if p.requires_grad]
    metric_key = f"val_{cfg.metric}"
    # Under a bf16 / fp16 base the adapters and head stay float32 (add_adapter(dtype=float32)); autocast
    # runs each op in the base's dtype so float32 head weights meet bf16 activations without a mismatch.
    low_precision = cfg.dtype not in (None, "float32")

    def amp() -> Any:
        return torch.autocast(device.type, dtype=DTYPES[cfg.dtype]) if low_precision else nullcontext()

    def checkpoint() -> None:  # called by every process at the same step
        rng = _rng_states(dist_state, device)
        if dist_state.main:
            _save_checkpoint(paths["checkpoint"], model, name, optimizer, scheduler, state, cfg.full, rng)

    from tqdm.auto import tqdm

    with _StopFlag() as stop:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            # an own generator: a DataLoader without one draws from the global RNG at every epoch start,
            # which would shift the dropout stream of a resumed run
            loader = DataLoader(train_set, batch_size=per_process, sampler=sampler, collate_fn=train_set.collate,
                                generator=torch.Generator().manual_seed(cfg.seed))
            bar = tqdm(total=steps_per_epoch, initial=state["skip"], desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and dist_state.main), leave=True, dynamic_ncols=True)
            if state["history"]:
                bar.set_postfix_str(f"{metric_key}={state['history'][-1][metric_key]:.4f}")
            started = time.perf_counter()
            model.train()
            for i, batch in enumerate(loader):
                if i < state["skip"]:
                    continue  # resumed mid-epoch: the sampler's order is seeded, so skip the done part
                batch = {k: v.to(device) for k, v in batch.items()}
                with amp():
                    loss = wrapped(**batch, adapter_names=name).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                state["skip"] = i + 1
                state["loss_sum"] += loss.item()
                state["loss_count"] += 1
                bar.update(1)
                bar.set_postfix_str(f"loss={state['loss_sum'] / state['loss_count']:.4f}" + (
                    f" {metric_key}={state['history'][-1][metric_key]:.4f}" if state["history"] else ""))
                stop_now = torch.tensor([1.0 if stop.set else 0.0], device=device)
                if _all_reduce(stop_now, dist_state).item() > 0:  # every process stops at the same step
                    checkpoint()
                    bar.close()
                    raise TrainingInterrupted(
                        f"stopped at step {state['step']}; checkpoint in {paths['checkpoint']} (resume to continue)"
                    )
                if cfg.checkpoint_steps and state["step"] % cfg.checkpoint_steps == 0 and state["skip"] < steps_per_epoch:
                    checkpoint()
            bar.close()
            state["epoch_seconds"].append(time.perf_counter() - started)
            with amp():
                scores = evaluate(model, name, val_set, batch_size=cfg.eval_batch_size, device=device, _dist=dist_state)
            record = {
                "epoch": epoch + 1,
                "step": state["step"],
                "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
                "val_loss": scores["loss"],
                "val_accuracy": scores["accuracy"],
                "val_macro_f1": scores["macro_f1"],
                "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": state["epoch_seconds"][-1],
            }
            improved = state["best"] is None or record[metric_key] > state["best"]
            record["best"] = improved
            state["history"].append(record)
            if improved:
                state["best"], state["best_epoch"] = record[metric_key], epoch + 1
                if dist_state.main:
                    metrics = {k: v for k, v in record.items() if k.startswith("val_")}
                    metrics["epoch"] = epoch + 1
                    if cfg.full:  # the base weights are part of a fully fine-tuned task
                        base_state = {k: v.detach().cpu().contiguous() for k, v in model.base.state_dict().items()}
                        _atomic_write(paths["base"], lambda p, s=base_state: save_file(_unshare(s), str(p)))
                    model.save_adapter(name, out, metrics=metrics, description=description)
            if dist_state.main:
                _write_log(paths["log"], state["history"])
                write_plot(paths["plot"], state["history"], cfg.metric, title=name)
                if cfg.progress:
                    tqdm.write(
                        f"{name} epoch {epoch + 1}: train_loss={record['train_loss']:.4f} "
                        f"val_loss={record['val_loss']:.4f} val_accuracy={record['val_accuracy']:.4f} "
                        f"val_macro_f1={record['val_macro_f1']:.4f}" + (" (best)" if improved else "")
                    )
            state.update({"epoch": epoch + 1, "skip": 0, "loss_sum": 0.0, "loss_count": 0})
            checkpoint()
    if dist_state.world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0's artifact is complete before anyone reads it
    restore_best(model, name, out, full=cfg.full)
    return TrainResult(
        artifact=out,
        best_metric=float(state["best"]),
        best_epoch=int(state["best_epoch"]),
        history=state["history"],
        parameters=report,
        epoch_seconds=list(state["epoch_seconds"]),
        labels=list(train_set.labels),
    )


def restore_best(model: AdapterModel, name: str, out: str | os.PathLike, *, full: bool = False) -> None:
    """Put the weights of the artifact ``out`` (and, for full fine-tuning, its base file) back into
    ``model``'s adapter ``name``."""
    paths = run_paths(out)
    device = model.device
    tensors = read_artifact(paths["artifact"]).tensors or {}
    model.adapters[name].load_state_dict({k: v.to(device) for k, v in tensors.items()})
    if full:
        model.base.load_state_dict({k: v.to(device) for k, v in load_file(str(paths["base"])).items()}, strict=False)


# ---------------------------------------------------------------------------------------------
# From paths: what the command line runs
# ---------------------------------------------------------------------------------------------


def train(
    base: str | os.PathLike,
    data: str | os.PathLike,
    task: str,
    out: str | os.PathLike,
    *,
    validation: str | os.PathLike | None = None,
    kind: str = "houlsby",
    adapter: AdapterConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    validation_fraction: float = 0.1,
    data_options: dict[str, Any] | None = None,
) -> TrainResult:
    """Load a base model and a task's data, add adapter ``task`` and train it (see ``fit``).

    Without ``validation``, a seeded stratified ``validation_fraction`` of ``data`` is held out.
    ``data_options`` go to ``data.load_task`` (column names, task type, encoding...).
    """
    from transformers import AutoModel, AutoTokenizer

    cfg = config or TrainConfig()
    options = dict(data_options or {})
    options.pop("labels", None)
    split = options.pop("split", "train")
    val_split_option = options.pop("validation_split", None)
    train_data = load_task(data, split=split, **options)
    if val_split_option is not None:
        options["validation_split"] = val_split_option
    if validation is not None:
        # a datasets folder given as both data and validation: read its "validation" split
        same = Path(str(validation)) == Path(str(data))
        val_split = options.pop("validation_split", "validation" if same else "train")
        validation_data = load_task(validation, labels=train_data.labels, split=val_split, **options)
    else:
        keep, held = stratified_split(train_data.label_ids(), [1 - validation_fraction, validation_fraction], cfg.seed)
        if not held:
            raise ValueError(f"{data}: too few examples to hold out a validation split; pass a validation file")
        train_data, validation_data = train_data.subset(keep), train_data.subset(held)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    tokenizer = AutoTokenizer.from_pretrained(base)
    base_model = AutoModel.from_pretrained(base, dtype=dtype) if dtype else AutoModel.from_pretrained(base)
    model = AdapterModel(base_model)
    if cfg.full:
        adapter = AdapterConfig(leave_out=list(range(model.num_layers)), train_layer_norms=False)
    elif adapter is None:
        adapter = AdapterConfig(kind=kind)
    torch.manual_seed(cfg.seed)  # the adapter's and head's initial weights, identical on every process
    model.add_adapter(
        task, adapter, head=train_data.task_type, labels=train_data.labels,
        dtype=torch.float32 if dtype is not None and not cfg.full else None,
    )
    return fit(model, task, train_data, validation_data, tokenizer, out, cfg, resume=resume)


def label_counts(data: TaskData) -> dict[str, int]:
    """How many examples carry each label (token tasks: each tag)."""
    counts = dict.fromkeys(data.labels, 0)
    for e in data.examples:
        for y in e.label if isinstance(e.label, list) else [e.label]:
            counts[data.labels[y]] += 1
    return counts


def describe(result: TrainResult) -> str:
    """One line summarising a run."""
    return (
        f"best epoch {result.best_epoch}: {result.best_metric:.4f}; {result.parameters}; artifact {result.artifact}"
    )


__all__: Sequence[str] = (
    "DTYPES", "TrainConfig", "TrainResult", "TrainingInterrupted", "evaluate", "fit", "label_counts",
    "metrics_from_confusion", "pick_device", "restore_best", "run_paths", "train", "write_plot",
)
