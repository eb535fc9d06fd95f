"""The aten op sequence of adapterkit's forward paths, as a count and a hash: a refactor that claims to
keep the hot path unchanged shows the same lines before and after (machine load cannot blur this).

    PYTHONPATH=src python benchmarks/op_sequence.py [--json out/op_sequence.json]

Tiny random BERT (tests/tinymodels.py), one Houlsby, Pfeiffer and parallel adapter each; per path one
warm-up call (fills the weight stacks), then one recorded call: one adapter for the batch and a mixed
batch, under inference mode and under autograd. Also prints the output's sum, to the last digit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from tinymodels import tiny_inputs, tiny_model  # noqa: E402

from adapterkit import AdapterConfig, AdapterModel  # noqa: E402


class _Record(TorchDispatchMode):
    """Every aten op dispatched inside the block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, help="also write the table here")
    args = parser.parse_args(argv)
    model = AdapterModel(tiny_model("bert"))
    configs = {"h": AdapterConfig("houlsby", bottleneck_size=4), "p": AdapterConfig("pfeiffer", bottleneck_size=3),
               "q": AdapterConfig("parallel", bottleneck_size=5, activation="relu")}
    for name, config in configs.items():
        model.add_adapter(name, config)
    model.eval()
    inputs = tiny_inputs("bert", batch=4)
    paths = [("single, inference", "h", torch.inference_mode), ("mixed, inference", ["h", "p", None, "q"], torch.inference_mode),
             ("single, autograd", "q", torch.enable_grad), ("mixed, autograd", ["q", "h", "p", "h"], torch.enable_grad)]
    table = {}
    for label, names, mode in paths:
        with mode():
            model(**inputs, adapter_names=names)
            with _Record() as record:
                out = model(**inputs, adapter_names=names).last_hidden_state
        digest = hashlib.sha256("\n".join(record.ops).encode()).hexdigest()[:16]
        table[label] = {"ops": len(record.ops), "sha256": digest, "output_sum": out.double().sum().item()}
        print(f"{label:18s} ops={len(record.ops):5d} sha256={digest} sum={out.double().sum().item():.12e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
