"""Old import path of ``adapterkit.training``; kept working.

Everything ``adapterkit.train`` offered is re-exported here. Rebinding a name on this module (as
``monkeypatch.setattr(adapterkit.train, "evaluate", ...)`` does in tests, or a script replacing a hook)
rebinds it in the ``adapterkit.training`` modules that use it, so code written against the old single
module behaves as it did.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .training import (  # noqa: F401
    DEFAULT_LR,
    DTYPES,
    METRICS,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    describe,
    evaluate,
    fit,
    label_counts,
    metrics_from_confusion,
    per_class_report,
    pick_device,
    restore_best,
    run_paths,
    train,
    write_log,
    write_plot,
)
from .training.checkpoint import _write_json  # noqa: F401
from .training.loop import _linear_schedule, _param_groups  # noqa: F401

__all__ = [
    "DTYPES", "TrainConfig", "TrainResult", "TrainingInterrupted", "evaluate", "fit", "label_counts",
    "metrics_from_confusion", "pick_device", "restore_best", "run_paths", "train", "write_plot",
]

_MISSING = object()


class _ForwardingModule(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        old = self.__dict__.get(name, _MISSING)
        if old is not _MISSING and not name.startswith("__"):
            for module in list(sys.modules.values()):
                if getattr(module, "__name__", "").startswith("adapterkit.training") and (
                    getattr(module, "__dict__", {}).get(name, _MISSING) is old
                ):
                    setattr(module, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _ForwardingModule
