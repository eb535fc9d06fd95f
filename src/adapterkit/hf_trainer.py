"""Old import path of ``adapterkit.training.hf`` (the Hugging Face ``Trainer`` subclass); kept working."""

from .training.hf import ARTIFACT_NAME, AdapterTrainer

__all__ = ["ARTIFACT_NAME", "AdapterTrainer"]
