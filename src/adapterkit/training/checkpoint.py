"""Checkpoints a run can resume from: safetensors for tensors, JSON for the rest, nothing pickled.

Layout of ``OUT.ckpt/``::

    latest.json                 {"dir": "step-00000120", "step": 120}  (the pointer; renamed in last)
    step-00000120/adapter.safetensors   the adapter artifact at that step, in its training form
                                        (prefix tuning's reparameterisation MLP unfolded)
    step-00000120/fusion.safetensors    instead, when a fusion trains: its artifact at that step
    step-00000120/base.safetensors      full fine-tuning only: the base model's weights
    step-00000120/trainer.safetensors   optimizer tensors and every process's RNG states
    step-00000120/state.json            step, epoch, history, optimizer scalars, scheduler, Python RNG

A new checkpoint is a fresh ``step-N`` folder, then the pointer, then older folders removed: a kill at
any moment leaves the previous checkpoint usable. After a successful run ``mark_complete`` may replace
all of it by a pointer that records the finished run alone (``{"complete": true, "state": ...}``), so
``--resume`` of a finished run still knows there is nothing left to do.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic_io import atomic_write, atomic_write_text
from ..model import AdapterModel

POINTER = "latest.json"


def _write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file, atomically."""
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def base_state(model: AdapterModel) -> dict[str, torch.Tensor]:
    """The base model's weights on the CPU, each key its own storage (safetensors refuses tensors that
    share memory, as tied embeddings do)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.base.state_dict().items():
        v = v.detach().cpu().contiguous()
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    """Inverse of ``optimizer_to_files``."""
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


def python_random_state() -> list[Any]:
    """``random.getstate()`` as JSON-able lists."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_random_state(saved: list[Any]) -> None:
    version, internal, gauss = saved
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    folder: Path,
    model: AdapterModel,
    name: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    state: dict[str, Any],
    full: bool,
    rng: dict[str, torch.Tensor],
    *,
    fusion: bool = False,
) -> None:
    """Write one checkpoint (layout in the module docstring) and drop the previous one."""
    folder.mkdir(parents=True, exist_ok=True)
    step_dir = folder / f"step-{state['step']:08d}"
    if step_dir.exists():
        shutil.rmtree(step_dir)
    step_dir.mkdir()
    if fusion:  # a fusion being trained (its members are fixed): its own artifact
        model.save_fusion(name, step_dir / "fusion.safetensors")
    else:
        model.save_adapter(name, step_dir / "adapter.safetensors", resumable=True)  # training form, as it trains
    if full:
        save_tensors(step_dir / "base.safetensors", base_state(model))
    tensors, opt_doc = optimizer_to_files(optimizer)
    tensors.update(rng)
    save_tensors(step_dir / "trainer.safetensors", tensors)
    doc = dict(state)
    doc["optimizer"] = opt_doc
    doc["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    doc["python_random"] = python_random_state()
    _write_json(step_dir / "state.json", doc)
    _write_json(folder / POINTER, {"dir": step_dir.name, "step": state["step"]})
    _remove_step_folders(folder, keep=step_dir.name)


def load_checkpoint(folder: Path) -> tuple[Path | None, dict[str, Any]] | None:
    """``(step folder, saved state)`` of the checkpoint in ``folder``; ``(None, state)`` for a finished
    run marked by ``mark_complete``; ``None`` when there is no checkpoint."""
    pointer = folder / POINTER
    if not pointer.exists():
        return None
    doc = json.loads(pointer.read_text())
    if doc.get("complete"):
        return None, doc["state"]
    step_dir = folder / doc["dir"]
    return step_dir, json.loads((step_dir / "state.json").read_text())


def load_checkpoint_tensors(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of one checkpoint: ``adapter``, ``trainer`` and (full fine-tuning) ``base``."""
    from ..artifact import read_artifact
    from ..fusion import read_fusion_tensors

    fused = step_dir / "fusion.safetensors"
    out = {  # "adapter": the trained module's tensors, an adapter's or a fusion's
        "adapter": read_fusion_tensors(fused) if fused.exists() else read_artifact(step_dir / "adapter.safetensors").tensors or {},
        "trainer": load_file(str(step_dir / "trainer.safetensors")),
    }
    if (step_dir / "base.safetensors").exists():
        out["base"] = load_file(str(step_dir / "base.safetensors"))
    return out


def mark_complete(folder: Path, state: dict[str, Any]) -> None:
    """After a successful run: replace the checkpoint (for ``--full``, hundreds of MB) by a pointer
    that records the finished run, so a later resume of the same run has nothing left to do."""
    if not folder.exists():
        return
    _write_json(folder / POINTER, {"complete": True, "step": state["step"], "state": state})
    _remove_step_folders(folder, keep=None)


def _remove_step_folders(folder: Path, keep: str | None) -> None:
    for old in folder.glob("step-*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
