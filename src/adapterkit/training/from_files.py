"""Training from paths, as the command line does: load the base model and the data, add the adapter,
``fit``; and the one-line summary of a run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..composition import Fuse, Stack
from ..config import AdapterConfig
from ..data import TaskData, load_task, stratified_split
from ..model import AdapterModel
from ..sites import SiteSpec
from ..tasks import TASKS
from .config import DTYPES, TrainConfig, TrainResult
from .loop import fit, quiet_loading


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
    sites: SiteSpec | str | None = None,
    stack_under: Sequence[str | os.PathLike] = (),
    fusion_of: Sequence[str | os.PathLike] = (),
) -> TrainResult:
    """Load a base model and a task's data, add adapter ``task`` and train it (see ``fit``).

    ``stack_under``: adapter artifacts (bottom first) loaded frozen, under the new adapter: every
    step and evaluation runs ``Stack(*under, task)``, and the artifact records each under-adapter's
    name and sha256 (``AdapterModel.adapter_info``; ``check_stacked_on``).

    ``fusion_of``: adapter artifacts (two or more, without norm affines) loaded frozen; instead of an
    adapter, an AdapterFusion ``task`` over them with the task's head trains, routed as
    ``Fuse(*members, fusion=task)``, and ``out`` is its fusion artifact (``AdapterModel.save_fusion``).

    Without ``validation``, a seeded stratified ``validation_fraction`` of ``data`` is held out.
    ``data_options`` go to ``data.load_task`` (column names, task type, encoding...). ``sites``: as for
    ``AdapterModel`` (``"guess"`` or a ``SiteSpec``) for an architecture the site table lacks.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cfg = config or TrainConfig()
    train_data, validation_data = _load_splits(data, validation, validation_fraction, cfg.seed, data_options)
    generation = TASKS[train_data.task_type].generation
    if generation is not None and cfg.metric != "accuracy":
        raise ValueError(f"a {train_data.task_type} task is scored by accuracy "
                         "(exact match of short answers, else token accuracy)")
    # a generative task trains through the LM's own head: a decoder's or an encoder-decoder's
    auto = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}.get(generation, AutoModel)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    # transformers' weight-loading bar is a progress bar too: shown only where ours would be
    with quiet_loading(not (cfg.progress and _stderr_is_terminal())):
        tokenizer = AutoTokenizer.from_pretrained(base)
        base_model = auto.from_pretrained(base, dtype=dtype) if dtype else auto.from_pretrained(base)
    model = AdapterModel(base_model, sites=sites)
    if (stack_under or fusion_of) and cfg.full:
        raise ValueError("stack_under / fusion_of train on top of frozen adapters; full fine-tuning trains the whole model")
    if stack_under and fusion_of:
        raise ValueError("give stack_under or fusion_of, not both")
    adapter_dtype = torch.float32 if dtype is not None and not cfg.full else None
    if fusion_of:
        if adapter is not None:
            raise ValueError("fusion_of trains a fusion over existing adapters: no adapter config to give")
        members = [model.load_adapter(path, dtype=adapter_dtype) for path in fusion_of]
        torch.manual_seed(cfg.seed)  # the fusion's and head's initial weights, identical on every process
        model.add_fusion(task, members, head=train_data.task_type, labels=train_data.labels, dtype=adapter_dtype)
        return fit(model, task, train_data, validation_data, tokenizer, out, cfg, resume=resume,
                   route=Fuse(*members, fusion=task))
    under = [model.load_adapter(path, dtype=adapter_dtype) for path in stack_under]
    if task in under:
        raise ValueError(f"the new adapter's name {task!r} is taken by an adapter it is stacked on; pick another --task")
    if cfg.full:
        adapter = AdapterConfig(leave_out=list(range(model.num_layers)), train_layer_norms=False)
    elif adapter is None:
        adapter = AdapterConfig(kind=kind)
    torch.manual_seed(cfg.seed)  # the adapter's and head's initial weights, identical on every process
    model.add_adapter(
        task, adapter, head=train_data.task_type, labels=train_data.labels,
        dtype=adapter_dtype,
    )
    route = Stack(*under, task) if under else None
    return fit(model, task, train_data, validation_data, tokenizer, out, cfg, resume=resume, route=route)


def _stderr_is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()


def _load_splits(
    data: str | os.PathLike,
    validation: str | os.PathLike | None,
    validation_fraction: float,
    seed: int,
    data_options: dict[str, Any] | None,
) -> tuple[TaskData, TaskData]:
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
        return train_data, load_task(validation, labels=train_data.labels, split=val_split, **options)
    keep, held = stratified_split(train_data.label_ids(), [1 - validation_fraction, validation_fraction], seed)
    if not held:
        raise ValueError(f"{data}: too few examples to hold out a validation split; pass a validation file")
    return train_data.subset(keep), train_data.subset(held)


def label_counts(data: TaskData) -> dict[str, int]:
    """How many examples carry each label (token tasks: each tag)."""
    counts = dict.fromkeys(data.labels, 0)
    for e in data.examples:
        for y in e.label if isinstance(e.label, list) else [e.label]:
            counts[data.labels[y]] += 1
    return counts


def describe(result: TrainResult) -> str:
    """One line summarising a run; it names the validation metric that chose the best epoch."""
    return (
        f"best epoch {result.best_epoch} of {len(result.history)}: {result.metric}={result.best_metric:.4f}; "
        f"{result.parameters}; artifact {result.artifact}"
    )
