"""``adapterkit train``: train one task's adapter (or fully fine-tune) from files, one command.

    adapterkit train --base PATH --data train.csv --task sentiment --kind houlsby --out runs/sentiment.safetensors
    torchrun --nproc_per_node 2 -m adapterkit.cli train ...   # same command, DDP
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import KINDS


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand to the ``adapterkit`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train a task adapter (or fully fine-tune) on CSV / TSV / JSON Lines / datasets data",
        description="Train one task's adapter with the Houlsby et al. recipe (AdamW, 10 %% linear warm-up "
        "then linear decay, batch 32); keeps the best artifact by the validation metric.",
    )
    p.add_argument("--base", required=True, help="base model: a Hugging Face folder (or hub id)")
    p.add_argument("--data", required=True, help="training data: .csv, .tsv, .jsonl, or a datasets folder / id")
    p.add_argument("--validation", help="validation data (default: a seeded stratified 10 %% of --data)")
    p.add_argument("--task", required=True, help="the adapter's name")
    p.add_argument("--out", required=True, help="artifact to write (.safetensors); log, plot, checkpoint go beside it")
    p.add_argument("--kind", default="houlsby", choices=KINDS)
    p.add_argument("--full", action="store_true", help="full fine-tuning (base + head) instead of an adapter")
    p.add_argument("--task-type", choices=("classification", "pair_classification", "token_classification"))
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column")
    p.add_argument("--label-column", default="label")
    p.add_argument("--tokens-column", default="tokens")
    p.add_argument("--tags-column", default="tags")
    p.add_argument("--split", default="train", help="split to train on, for datasets data")
    p.add_argument("--validation-split", help="split to validate on, for datasets data (default: validation)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of CSV / TSV / JSON Lines files")
    p.add_argument("--bottleneck-size", type=int, help="bottleneck width r (default: hidden size / 16)")
    p.add_argument("--reduction-factor", type=float)
    p.add_argument("--activation", default="gelu")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter's output")
    p.add_argument("--train-layer-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="train per-task layer-norm affines (default: yes for houlsby)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3 adapters, 5e-5 --full)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split across DDP processes)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--metric", default="accuracy", choices=("accuracy", "macro_f1"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="base model dtype (adapters train in float32)")
    p.add_argument("--checkpoint-steps", type=int, default=100, help="checkpoint every N steps too (0: epoch ends only)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterkit train``; errors are one line on stderr and exit status 2."""
    import torch

    from ..artifact import ArtifactError
    from ..data import DataError
    from . import TrainConfig, TrainingInterrupted, describe, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from ..config import AdapterConfig

        adapter = None
        if not args.full:
            adapter = AdapterConfig(
                kind=args.kind, bottleneck_size=args.bottleneck_size, reduction_factor=args.reduction_factor,
                activation=args.activation, dropout=args.dropout, train_layer_norms=args.train_layer_norms,
            )
        config = TrainConfig(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay, max_length=args.max_length, seed=args.seed, full=args.full,
            metric=args.metric, device=args.device, dtype=args.dtype, checkpoint_steps=args.checkpoint_steps,
            progress=not args.no_progress,
        )
        options = {
            "task_type": args.task_type, "text_column": args.text_column, "text_pair_column": args.text_pair_column,
            "label_column": args.label_column, "tokens_column": args.tokens_column, "tags_column": args.tags_column,
            "encoding": args.encoding, "split": args.split,
        }
        if args.validation_split:
            options["validation_split"] = args.validation_split
        result = train(
            args.base, args.data, args.task, args.out, validation=args.validation, kind=args.kind, adapter=adapter,
            config=config, resume=args.resume, data_options=options,
        )
    except TrainingInterrupted as e:
        print(f"adapterkit train: interrupted: {e}", file=sys.stderr)
        return 130
    except (DataError, ArtifactError, ValueError, OSError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"adapterkit train: error: {message}", file=sys.stderr)
        return 2
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(result))
    return 0
