"""Old import path of ``adapterkit.training.cli`` (the ``adapterkit train`` command); kept working."""

from .training.cli import register, run

__all__ = ["register", "run"]
