"""The epoch loop, in small steps: prepare, restore (on resume), train an epoch, end the epoch, finish.

``fit`` is the whole of it::

    run = _prepare(...)          # device, datasets, sampler, optimizer, schedule, seeds, fresh state
    _restore(run)                # resume: weights, optimizer, schedule, RNG states, history
    while epochs remain:
        _train_epoch(run, stop)  # optimizer steps; step checkpoints; SIGINT / SIGTERM -> checkpoint, raise
        _end_of_epoch(run)       # evaluate, keep the best artifact, log, plot, report, checkpoint
    return _finish(run)          # the best weights back into the model, checkpoint tidied

Distributed: under ``torchrun --nproc_per_node N`` the model is wrapped in DDP, each process takes
``batch_size / N`` rows of every global batch (DistributedSampler), evaluation is sharded and reduced,
and rank 0 alone writes files.
"""

from __future__ import annotations

import gc
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from ..artifact import read_artifact
from ..composition import Block, Entry, Fuse, Parallel, Stack, check_entry
from ..data import EncodedTask, TaskData
from ..fusion import read_fusion_tensors
from ..model import AdapterModel, ParameterReport
from .checkpoint import (
    base_state,
    load_checkpoint,
    load_checkpoint_tensors,
    mark_complete,
    optimizer_from_files,
    save_checkpoint,
    save_tensors,
    set_python_random_state,
)
from .config import DTYPES, TrainConfig, TrainingInterrupted, TrainResult, run_paths
from .distributed import (
    Dist,
    all_reduce,
    barrier,
    close_distributed,
    gather_rng_states,
    init_distributed,
    pick_device,
    restore_rng_states,
)
from .evaluate import evaluate
from .plot import write_log, write_plot


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


class _Progress:
    """What a person watching sees: a bar per epoch when stderr is a terminal, else one line per epoch
    (a bar redrawn into a file or a CI log is one line per step); nothing with ``progress=False`` or
    on ranks other than 0."""

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        self.on = cfg.progress and dist.main
        self.bars = self.on and sys.stderr.isatty()

    def bar(self, total: int, initial: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not self.bars, leave=True, dynamic_ncols=True)

    def line(self, text: str) -> None:
        if not self.on:
            return
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(text)  # above the bar, not through it
        else:
            print(text, flush=True)


@dataclass
class _Run:
    """Everything one run carries from step to step. ``state`` is what a checkpoint saves."""

    model: AdapterModel
    name: str
    cfg: TrainConfig
    out: Path
    description: str
    dist: Dist
    device: torch.device
    report: ParameterReport
    train_set: EncodedTask
    val_set: EncodedTask
    sampler: DistributedSampler
    per_process: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    wrapped: torch.nn.Module
    params: list[torch.nn.Parameter]
    state: dict[str, Any]
    progress: _Progress
    # what every step and evaluation routes to: ``name`` itself, or a block that holds it
    # (``Stack(*under, name)``; for a fusion ``Fuse(*members, fusion=name)``)
    route: str | Block = ""
    fusion: bool = False  # ``name`` is a fusion (``model.fusions``), not an adapter

    @property
    def trainee(self) -> torch.nn.Module:
        return self.model.fusions[self.name] if self.fusion else self.model.adapters[self.name]

    @property
    def paths(self) -> dict[str, Path]:
        return run_paths(self.out)

    @property
    def metric_key(self) -> str:
        return f"val_{self.cfg.metric}"

    def amp(self) -> Any:
        # Under a bf16 / fp16 base the adapters and head stay float32 (add_adapter(dtype=float32));
        # autocast runs each op in the base's dtype so float32 head weights meet bf16 activations.
        if self.cfg.dtype in (None, "float32"):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.cfg.dtype])

    def checkpoint(self) -> None:
        """Called by every process at the same step (the RNG gather is collective); rank 0 writes."""
        rng = gather_rng_states(self.dist, self.device)
        if self.dist.main:
            save_checkpoint(self.paths["checkpoint"], self.model, self.name, self.optimizer, self.scheduler,
                            self.state, self.cfg.full, rng, fusion=self.fusion)


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
    route: Entry = None,
) -> TrainResult:
    """Train adapter ``name`` (already added to ``model``, with its head) and keep the best artifact.

    ``config.full`` trains the base model too. Returns the best validation metric and the history;
    afterwards the model holds the best weights. Raises TrainingInterrupted on SIGINT / SIGTERM (after
    a checkpoint), and ValueError when ``resume`` finds a checkpoint of a different run.

    ``route``: what every training step and evaluation runs, when not ``name`` alone: a block holding
    ``name`` (``Stack("domain", name)``: the other members stay frozen, and the artifact records the
    adapters under it by name and sha256). ``name`` may be a fusion (``model.add_fusion``): the route
    is then ``Fuse(*members, fusion=name)`` (or a block holding it), only the fusion trains, and the
    artifact is ``save_fusion``'s.
    """
    cfg = config or TrainConfig()
    dist = init_distributed(cfg.device)
    run = None
    try:
        run = _prepare(model, name, train_data, validation_data, tokenizer, Path(out), cfg, description, dist,
                       route)
        if resume:
            _restore(run)
        with _StopFlag() as stop:
            while run.state["epoch"] < cfg.epochs:
                _train_epoch(run, stop)
                _end_of_epoch(run)
        return _finish(run)
    finally:
        if run is not None and dist.world > 1:
            _release_ddp(run)
        close_distributed(dist)


def _release_ddp(run: _Run) -> None:
    """Free the DDP wrapper while the process group is still registered. Its C++ reducer holds a
    reference to the group; freed after ``destroy_process_group``, it would drop the last one and run
    gloo's destructor with the GIL held, which joins a worker thread that may be waiting for the GIL
    to free a finished collective's tensors: a deadlock seen at the end of 2-process runs."""
    run.wrapped = run.model
    gc.collect()  # DDP's own reference cycles, if any


def _prepare(
    model: AdapterModel,
    name: str,
    train_data: TaskData | EncodedTask,
    validation_data: TaskData | EncodedTask,
    tokenizer: Any,
    out: Path,
    cfg: TrainConfig,
    description: str,
    dist: Dist,
    route: Entry = None,
) -> _Run:
    """Device, dtype, trainable parameters, datasets, sampler, optimizer, schedule, seeds, fresh state."""
    route, fusion = training_route(model, name, route)
    if cfg.full and route != name:
        raise ValueError(f"full fine-tuning trains one adapter alone, not under the route {route!r}")
    device = pick_device(cfg.device, dist.local_rank)
    if cfg.batch_size % dist.world:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {dist.world} processes")
    model.to(device)
    if cfg.dtype is not None:
        model.base.to(DTYPES[cfg.dtype])
    if cfg.full:
        report = model.train_full(name)
    else:  # the other members of the route stay frozen
        report = model.train_fusion(name) if fusion else model.train_adapter(name)
    if cfg.adapter_drop > model.num_layers:
        raise ValueError(f"adapter_drop is {cfg.adapter_drop}, but the model has {model.num_layers} layers")

    def encoded(data: TaskData | EncodedTask) -> EncodedTask:
        return data if isinstance(data, EncodedTask) else EncodedTask(data, tokenizer, cfg.max_length)

    train_set, val_set = encoded(train_data), encoded(validation_data)
    per_process = cfg.batch_size // dist.world
    sampler = DistributedSampler(train_set, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / per_process)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_schedule(max(1, round(cfg.warmup_ratio * total_steps)), total_steps)
    )
    # Same seed on every process for the parts that must agree; dropout differs per process.
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + dist.rank)
    run_id = {"train_size": len(train_set), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
              "world": dist.world, "full": cfg.full, "lr": cfg.learning_rate, "seed": cfg.seed}
    if route != name:  # (absent for a plain run, so its checkpoints are as before)
        run_id["route"] = repr(route)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "skip": 0, "best": None, "best_epoch": 0, "history": [],
                             "epoch_seconds": [], "run": run_id, "loss_sum": 0.0, "loss_count": 0}
    wrapped: torch.nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # the base's pooler is never used by our heads; dropped layers' adapters get no gradient
            find_unused_parameters=cfg.full or cfg.adapter_drop > 0,
        )
    return _Run(
        model=model, name=name, cfg=cfg, out=out, description=description, dist=dist, device=device, report=report,
        train_set=train_set, val_set=val_set, sampler=sampler, per_process=per_process,
        steps_per_epoch=steps_per_epoch, optimizer=optimizer, scheduler=scheduler, wrapped=wrapped,
        params=[p for p in model.parameters() if p.requires_grad], state=state, progress=_Progress(cfg, dist),
        route=route, fusion=fusion,
    )


def training_route(model: AdapterModel, name: str, route: Entry = None) -> tuple[str | Block, bool]:
    """``(route, is_fusion)`` for training ``name``: ``route`` checked (its adapters and fusions loaded,
    ``name`` in it), or by default ``name`` itself (a fusion's own ``Fuse(*members, fusion=name)``)."""
    if route is None:
        if name not in model.adapters and name in model.fusions:
            return Fuse(*model.fusions[name].members, fusion=name), True
        model._get(name)  # KeyError naming what is loaded
        return name, False
    if isinstance(route, str):
        if route != name:
            raise ValueError(f"route {route!r} does not run the adapter being trained, {name!r}")
        model._get(name)
        return name, False
    if not isinstance(route, Block) or isinstance(route, Parallel):
        raise ValueError(f"route must be an adapter name or a Stack / Average / Fuse block; got {route!r}")
    check_entry(route, model._get, model._get_fusion)
    fusion = name in _fusions_in(route)
    if not fusion and name not in route.leaves():
        raise ValueError(f"route {route!r} does not hold {name!r}, the adapter (or fusion) being trained")
    return route, fusion


def _fusions_in(entry: Entry) -> list[str]:
    if not isinstance(entry, Block):
        return []
    own = [entry.fusion] if isinstance(entry, Fuse) else []
    return own + [f for m in entry.members for f in _fusions_in(m)]


def stacked_under(route: str | Block, name: str) -> list[str] | None:
    """The adapters under ``name`` when ``route`` is ``Stack(*under, name)`` of plain names; else None."""
    if type(route) is Stack and route.members[-1] == name and all(isinstance(m, str) for m in route.members):
        return list(route.members[:-1])
    return None


def _restore(run: _Run) -> None:
    """Continue from the checkpoint beside ``out``, if there is one: weights, optimizer, schedule, every
    RNG, history. A checkpoint of another run (other data size, epochs, batch, lr, seed...) is refused."""
    folder = run.paths["checkpoint"]
    found = load_checkpoint(folder)
    if found is None:
        run.progress.line(f"no checkpoint in {folder}; starting from the beginning")
        return
    step_dir, saved = found
    if saved["run"] != run.state["run"]:
        raise ValueError(
            f"{folder}: checkpoint is from a different run ({saved['run']}); "
            f"this run is {run.state['run']}. Delete it or start without --resume"
        )
    if step_dir is not None:  # else a finished run: nothing to load, nothing left to train
        tensors = load_checkpoint_tensors(step_dir)
        run.trainee.load_state_dict(tensors["adapter"])
        if run.cfg.full:
            run.model.base.load_state_dict(tensors["base"], strict=False)
        optimizer_from_files(run.optimizer, tensors["trainer"], saved["optimizer"])
        run.scheduler.load_state_dict({**saved["scheduler"], "lr_lambdas": [None] * len(run.optimizer.param_groups)})
        restore_rng_states(tensors["trainer"], run.dist, run.device)
        set_python_random_state(saved["python_random"])
    run.state.update({k: saved[k] for k in run.state})
    where = step_dir if step_dir is not None else folder
    run.progress.line(f"resuming from {where} (epoch {run.state['epoch'] + 1}, step {run.state['step']})")


def _train_epoch(run: _Run, stop: _StopFlag) -> None:
    """One epoch of optimizer steps (the rest of it, when resumed mid-epoch)."""
    state, cfg = run.state, run.cfg
    epoch = state["epoch"]
    run.sampler.set_epoch(epoch)
    # an own generator: a DataLoader without one draws from the global RNG at every epoch start,
    # which would shift the dropout stream of a resumed run
    loader = DataLoader(run.train_set, batch_size=run.per_process, sampler=run.sampler,
                        collate_fn=run.train_set.collate, generator=torch.Generator().manual_seed(cfg.seed))
    bar = run.progress.bar(run.steps_per_epoch, state["skip"], f"{run.name} epoch {epoch + 1}/{cfg.epochs}")
    last = f" {run.metric_key}={state['history'][-1][run.metric_key]:.4f}" if state["history"] else ""
    started = time.perf_counter()
    run.model.train()
    try:
        for i, batch in _batches(loader, skip=state["skip"]):
            loss = _train_step(run, batch)
            state["step"] += 1
            state["skip"] = i + 1
            state["loss_sum"] += loss
            state["loss_count"] += 1
            bar.update(1)
            bar.set_postfix_str(f"loss={state['loss_sum'] / state['loss_count']:.4f}{last}", refresh=False)
            stop_now = torch.tensor([1.0 if stop.set else 0.0], device=run.device)
            if all_reduce(stop_now, run.dist).item() > 0:  # every process stops at the same step
                run.checkpoint()
                raise TrainingInterrupted(
                    f"stopped at step {state['step']}; checkpoint in {run.paths['checkpoint']} (resume to continue)"
                )
            if cfg.checkpoint_steps and state["step"] % cfg.checkpoint_steps == 0 and state["skip"] < run.steps_per_epoch:
                run.checkpoint()
    finally:
        bar.close()
    state["epoch_seconds"].append(time.perf_counter() - started)


def _batches(loader: DataLoader, skip: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    # resumed mid-epoch: the sampler's order is seeded, so the same batches come; skip the done part
    for i, batch in enumerate(loader):
        if i >= skip:
            yield i, batch


def _train_step(run: _Run, batch: dict[str, torch.Tensor]) -> float:
    """One optimizer step on one batch; returns its loss."""
    batch = {k: v.to(run.device) for k, v in batch.items()}
    drop = dropped_layers(run.cfg, run.state["step"])
    with run.amp():
        if drop:  # the route carries the drop; DDP's forward runs in this thread, under it
            with run.model.route(run.route, drop_below=drop):
                loss = run.wrapped(**batch).loss
        else:
            loss = run.wrapped(**batch, adapter_names=run.route).loss
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    return loss.item()


def dropped_layers(cfg: TrainConfig, step: int) -> int:
    """Stochastic AdapterDrop: how many of the lowest layers run without adapters at ``step``."""
    if not cfg.adapter_drop:
        return 0
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return int(torch.randint(0, cfg.adapter_drop + 1, (1,), generator=g))


def _end_of_epoch(run: _Run) -> None:
    """Evaluate, keep the artifact if this epoch is the best so far, write log and plot, report one
    line, checkpoint."""
    state, cfg = run.state, run.cfg
    epoch = state["epoch"] + 1
    with run.amp():
        scores = evaluate(run.model, run.route, run.val_set, batch_size=cfg.eval_batch_size, device=run.device,
                          _dist=run.dist)
    record = {
        "epoch": epoch,
        "step": state["step"],
        "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
        # val_loss, val_accuracy, val_macro_f1; causal_lm, seq2seq: val_perplexity, val_exact_match... instead of F1
        **{f"val_{k}": v for k, v in scores.items()},
        "lr": run.scheduler.get_last_lr()[0],
        "epoch_seconds": state["epoch_seconds"][-1],
    }
    improved = state["best"] is None or record[run.metric_key] > state["best"]
    record["best"] = improved
    state["history"].append(record)
    if improved:
        state["best"], state["best_epoch"] = record[run.metric_key], epoch
        if run.dist.main:
            _save_best(run, record)
    if run.dist.main:
        write_log(run.paths["log"], state["history"])
        write_plot(run.paths["plot"], state["history"], cfg.metric, title=run.name)
        run.progress.line(
            f"{run.name} epoch {epoch}/{cfg.epochs}: train_loss={record['train_loss']:.4f} "
            + " ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("val_"))
            + f" ({record['epoch_seconds']:.0f} s)"
            + (" best" if improved else "")
        )
    state.update({"epoch": epoch, "skip": 0, "loss_sum": 0.0, "loss_count": 0})
    run.checkpoint()


def _save_best(run: _Run, record: dict[str, Any]) -> None:
    """Write this epoch's artifact (and, for full fine-tuning, the base weights it belongs to)."""
    metrics = {k: v for k, v in record.items() if k.startswith("val_")}
    metrics["epoch"] = record["epoch"]
    if run.cfg.full:  # the base weights are part of a fully fine-tuned task
        save_tensors(run.paths["base"], base_state(run.model))
    if run.fusion:
        run.model.save_fusion(run.name, run.out, metrics=metrics, description=run.description)
    else:
        run.model.save_adapter(run.name, run.out, metrics=metrics, description=run.description,
                               stacked_on=stacked_under(run.route, run.name))


def _finish(run: _Run) -> TrainResult:
    """Every process waits for rank 0's artifact, loads the best weights back, and (unless asked to keep
    it) the checkpoint shrinks to a marker of the finished run."""
    barrier(run.dist)  # rank 0's artifact is complete before anyone reads it
    restore_best(run.model, run.name, run.out, full=run.cfg.full, fusion=run.fusion)
    if run.dist.main and not run.cfg.keep_checkpoints:
        mark_complete(run.paths["checkpoint"], run.state)
    return TrainResult(
        artifact=run.out,
        best_metric=float(run.state["best"]),
        best_epoch=int(run.state["best_epoch"]),
        history=run.state["history"],
        parameters=run.report,
        epoch_seconds=list(run.state["epoch_seconds"]),
        labels=list(run.train_set.labels),
        metric=run.metric_key,
    )


def restore_best(model: AdapterModel, name: str, out: str | os.PathLike, *, full: bool = False,
                 fusion: bool = False) -> None:
    """Put the weights of the artifact ``out`` (and, for full fine-tuning, its base file) back into
    ``model``'s adapter ``name`` (``fusion``: its fusion ``name``, from a fusion artifact)."""
    paths = run_paths(out)
    device = model.device
    if fusion:
        tensors = read_fusion_tensors(paths["artifact"])
        model.fusions[name].load_state_dict({k: v.to(device) for k, v in tensors.items()})
        return
    tensors = read_artifact(paths["artifact"]).tensors or {}
    model.adapters[name].load_state_dict({k: v.to(device) for k, v in tensors.items()})
    if full:
        model.base.load_state_dict({k: v.to(device) for k, v in load_file(str(paths["base"])).items()}, strict=False)


@contextmanager
def quiet_loading(quiet: bool) -> Iterator[None]:
    """Without transformers' weight-loading bar while ``quiet`` (restored afterwards)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
