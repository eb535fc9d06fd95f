"""Training an adapter with the Hugging Face ``Trainer``; its checkpoints hold only the adapter artifact.

    model.add_adapter("sentiment", AdapterConfig("houlsby"), head="classification", labels=["neg", "pos"])
    trainer = AdapterTrainer(model=model, adapter_name="sentiment", args=TrainingArguments(...),
                             train_dataset=EncodedTask(...), data_collator=dataset.collate)
    trainer.train()

Each checkpoint (and ``save_model``) writes ``adapter.safetensors`` (the core's one-file artifact)
instead of the base model's weights; ``training_args.bin`` (a pickle) is not written and
``save_only_model`` is forced on, so no optimizer pickles either. ``load_best_model_at_end`` and
``resume_from_checkpoint`` read that artifact back. Use ``adapterkit.training.fit`` for resumable
optimizer state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import Trainer

from ..artifact import read_artifact
from ..model import AdapterModel

ARTIFACT_NAME = "adapter.safetensors"


class AdapterTrainer(Trainer):
    """A ``Trainer`` for one adapter of an ``AdapterModel``: trains only that adapter (its bottlenecks,
    norm affines and head) and saves only its artifact."""

    def __init__(self, model: AdapterModel, adapter_name: str, *args: Any, **kwargs: Any):
        self.adapter_name = adapter_name
        model.train_adapter(adapter_name)
        training_args = kwargs.get("args") if "args" in kwargs else (args[0] if args else None)
        if training_args is not None:
            training_args.save_only_model = True  # optimizer / RNG state would be pickles
            training_args.remove_unused_columns = False  # forward takes **kwargs; keep every column
        super().__init__(model, *args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        outputs = model(**inputs, adapter_names=self.adapter_name)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self._adapter_model().save_adapter(self.adapter_name, folder / ARTIFACT_NAME)

    def _adapter_model(self) -> AdapterModel:
        model = self.model
        while not isinstance(model, AdapterModel) and hasattr(model, "module"):
            model = model.module
        return model

    def _load_artifact(self, folder: str | os.PathLike) -> None:
        tensors = read_artifact(Path(folder) / ARTIFACT_NAME).tensors or {}
        model = self._adapter_model()
        device = model.device
        model.adapters[self.adapter_name].load_state_dict({k: v.to(device) for k, v in tensors.items()})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._load_artifact(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            self._load_artifact(self.state.best_model_checkpoint)
