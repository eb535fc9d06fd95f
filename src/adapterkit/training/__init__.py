"""Training one task: the Houlsby et al. recipe by default, full fine-tuning through the same loop.

    result = train(base="path/to/model", data="train.csv", task="sentiment", out="runs/sentiment.safetensors")

Recipe (``TrainConfig`` defaults): AdamW, linear warm-up over the first 10 % of steps then linear decay
to zero, batch 32, adapter + layer norms + head trained, everything seeded. Each epoch ends with an
evaluation on the validation split; the best one is kept as the artifact. Next to the artifact ``OUT``
(``runs/sentiment.safetensors``):

- ``runs/sentiment.log.jsonl``: one JSON line per evaluation;
- ``runs/sentiment.png``: loss and metric curves;
- ``runs/sentiment.ckpt/``: the last checkpoint, from which ``resume=True`` continues (see
  ``checkpoint``). SIGINT / SIGTERM stop the run after the current step with a fresh checkpoint; a
  hard kill loses at most the steps since the last one, never a file (every write is atomic).
- with ``full=True``, ``runs/sentiment.base.safetensors``: the fine-tuned base weights.

The modules, each one step of a run:

- ``config``: ``TrainConfig``, ``TrainResult``, ``run_paths``;
- ``loop``: ``fit``, the epoch loop in small steps (prepare, restore, epoch, end of epoch, finish);
- ``checkpoint``: resumable state as safetensors + JSON;
- ``distributed``: torchrun's process group, devices, collectives, per-process RNG states;
- ``evaluate``: loss, accuracy, macro-F1, per-class report from a confusion matrix;
- ``plot``: the JSON Lines log and the PNG of the curves;
- ``from_files``: ``train`` from paths (what ``adapterkit train`` runs);
- ``predict``: ``load_trained`` (``--full`` results too), predicting and scoring files;
- ``cli``: the ``adapterkit train``, ``predict`` and ``evaluate`` commands;
- ``hf``: ``AdapterTrainer``, a Hugging Face ``Trainer`` that saves only the adapter (imported on its
  own: ``from adapterkit.training.hf import AdapterTrainer``).
"""

from .config import DEFAULT_LR, DTYPES, METRICS, TrainConfig, TrainingInterrupted, TrainResult, run_paths
from .distributed import pick_device
from .evaluate import evaluate, metrics_from_confusion, per_class_report
from .from_files import describe, label_counts, train
from .loop import fit, restore_best
from .plot import write_log, write_plot
from .predict import load_trained

__all__ = [
    "DEFAULT_LR", "DTYPES", "METRICS", "TrainConfig", "TrainResult", "TrainingInterrupted", "describe", "evaluate",
    "fit", "label_counts", "load_trained", "metrics_from_confusion", "per_class_report", "pick_device", "restore_best",
    "run_paths", "train", "write_log", "write_plot",
]
