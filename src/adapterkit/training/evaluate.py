"""Scoring an adapter on labelled data: loss, accuracy, macro-F1, and a per-class report.

Everything is computed from one (L, L) confusion matrix (rows gold, columns predicted), which sums
across DDP processes, so a sharded evaluation gives the same numbers as a single one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from ..composition import Block
from ..data import EncodedTask
from ..model import AdapterModel
from ..tasks import TASKS
from .distributed import Dist, all_reduce


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


def per_class_report(confusion: torch.Tensor, labels: list[str]) -> list[dict[str, Any]]:
    """One row per label: precision, recall, F1 and support (gold count), from an (L, L) confusion
    matrix. A label never predicted has precision 0; one absent from gold has recall 0."""
    confusion = confusion.double()
    tp = confusion.diag()
    gold, pred = confusion.sum(1), confusion.sum(0)
    rows = []
    for i, label in enumerate(labels):
        precision = (tp[i] / pred[i]).item() if pred[i] > 0 else 0.0
        recall = (tp[i] / gold[i]).item() if gold[i] > 0 else 0.0
        f1 = 2 * tp[i].item() / (gold[i] + pred[i]).item() if gold[i] + pred[i] > 0 else 0.0
        rows.append({"label": label, "precision": precision, "recall": recall, "f1": f1, "support": int(gold[i].item())})
    return rows


@torch.no_grad()
def confusion_and_loss(
    model: AdapterModel,
    name: str | Block,
    data: EncodedTask,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dist: Dist | None = None,
) -> tuple[torch.Tensor, float]:
    """The (L, L) confusion matrix (float64, CPU) and the mean cross-entropy of adapter ``name`` on
    ``data``; tokens labelled -100 are ignored. Under DDP each process takes every N-th example and the
    sums are reduced across processes (collective)."""
    dist_state = dist or Dist()
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
    all_reduce(confusion, dist_state)
    all_reduce(loss_sum, dist_state)
    model.train(was_training)
    return confusion.cpu(), (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


def evaluate(
    model: AdapterModel,
    name: str | Block,
    data: EncodedTask,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    _dist: Dist | None = None,
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of adapter ``name`` on ``data`` (tokens with label -100 ignored).
    ``name`` may be a composition (``Stack("domain", "ner")``, ``Fuse(..., fusion="f")``): every row runs it.

    Under DDP each process takes every N-th example and the counts are summed across processes.
    Generative tasks (``TaskType.generation``) get ``causal_lm.evaluate_lm``'s (a decoder) or
    ``seq2seq.evaluate_seq2seq``'s (an encoder-decoder) scores: exact match or token accuracy as
    ``accuracy``, perplexity."""
    generation = TASKS[data.task_type].generation
    if generation == "causal":
        from ..causal_lm import evaluate_lm

        return evaluate_lm(model, name, data, batch_size=batch_size, device=device, dist=_dist)
    if generation == "seq2seq":
        from ..seq2seq import evaluate_seq2seq

        return evaluate_seq2seq(model, name, data, batch_size=batch_size, device=device, dist=_dist)
    confusion, loss = confusion_and_loss(model, name, data, batch_size=batch_size, device=device, dist=_dist)
    out = metrics_from_confusion(confusion)
    out["loss"] = loss
    return out
