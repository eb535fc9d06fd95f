"""The run's record beside its artifact: the JSON Lines log and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write, atomic_write_text


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """One JSON line per evaluation (the whole history, rewritten atomically after each epoch)."""
    atomic_write_text(path, "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def write_plot(path: Path, history: list[dict[str, Any]], metric: str, title: str = "") -> None:
    """PNG of training / validation loss and the validation metric against epochs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and safe in worker processes
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    try:
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
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=80))
    finally:
        plt.close(fig)
