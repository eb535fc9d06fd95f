"""``adapterkit train``, ``adapterkit predict``, ``adapterkit evaluate``: train a task, use it on files.

    adapterkit train --base PATH --data train.csv --task sentiment --kind houlsby --out runs/sentiment.safetensors
    torchrun --nproc_per_node 2 -m adapterkit.cli train ...   # same command, DDP
    adapterkit train ... --stack-under runs/domain.safetensors --task ner --out runs/ner.safetensors   # Stack(domain, ner)
    adapterkit train ... --fusion-of runs/a.safetensors runs/b.safetensors --task f --out runs/f.safetensors  # AdapterFusion
    adapterkit predict runs/sentiment.safetensors runs/topic.safetensors --base PATH --data new.csv --out preds.csv
    adapterkit evaluate runs/sentiment.safetensors --base PATH --data test.csv --json scores.json
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..config import KINDS
from ..tasks import TASKS, TRAINABLE_TYPES
from .config import DEFAULT_LR, METRICS

# Adapter options: with --full there is no adapter, so giving any of them is a mistake worth saying.
_ADAPTER_OPTIONS = {
    "kind": "--kind", "bottleneck_size": "--bottleneck-size", "reduction_factor": "--reduction-factor",
    "activation": "--activation", "dropout": "--dropout", "train_layer_norms": "--[no-]train-layer-norms",
    "lora_r": "--lora-r", "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets", "ia3_targets": "--ia3-targets",
}


def register(subparsers: Any) -> None:
    """Add the ``train``, ``predict`` and ``evaluate`` subcommands to the ``adapterkit`` parser."""
    _register_train(subparsers)
    _register_predict(subparsers)
    _register_evaluate(subparsers)


def _data_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column")
    p.add_argument("--tokens-column", default="tokens")
    p.add_argument("--split", default="train", help="split to read, for datasets data")
    p.add_argument("--encoding", default="utf-8", help="text encoding of CSV / TSV / JSON Lines files")


def _register_train(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a task adapter (or fully fine-tune) on CSV / TSV / JSON Lines / datasets data",
        description="Train one task's adapter with the Houlsby et al. recipe (AdamW, 10 %% linear warm-up "
        "then linear decay, batch 32); keeps the best artifact by the validation metric. On a terminal "
        "each epoch shows a progress bar; otherwise one line per epoch is printed.",
    )
    p.add_argument("--base", required=True, help="base model: a Hugging Face folder (or hub id)")
    p.add_argument("--data", required=True, help="training data: .csv, .tsv, .jsonl, or a datasets folder / id")
    p.add_argument("--validation", help="validation data (default: a seeded stratified 10 %% of --data)")
    p.add_argument("--task", required=True, help="the adapter's name")
    p.add_argument("--out", required=True, help="artifact to write (.safetensors); log, plot, checkpoint go beside it")
    p.add_argument("--kind", choices=KINDS, help="adapter kind (default: houlsby)")
    p.add_argument("--full", action="store_true", help="full fine-tuning (base + head) instead of an adapter; "
                   "also writes OUT.base.safetensors, the fine-tuned base weights the artifact belongs to")
    p.add_argument("--task-type", choices=TRAINABLE_TYPES)
    _data_columns(p)
    p.add_argument("--label-column", default="label")
    p.add_argument("--tags-column", default="tags")
    p.add_argument("--prompt-column", default="prompt", help="causal_lm, seq2seq: the prompt")
    p.add_argument("--response-column", default="response", help="causal_lm, seq2seq: the answer the loss is on")
    p.add_argument("--messages-column", default="messages", help="causal_lm: a chat (rendered with the chat template)")
    p.add_argument("--validation-split", help="split to validate on, for datasets data (default: validation)")
    p.add_argument("--bottleneck-size", type=int, help="bottleneck width r (default: hidden size / 16)")
    p.add_argument("--reduction-factor", type=float)
    p.add_argument("--activation", help="adapter activation (default: gelu)")
    p.add_argument("--dropout", type=float, help="dropout on the adapter's output (default: 0)")
    p.add_argument("--lora-r", type=int, help="--kind lora: the rank r (default 8)")
    p.add_argument("--lora-alpha", type=float, help="--kind lora: alpha; the update is scaled by alpha / r (default: r)")
    p.add_argument("--lora-targets", help="--kind lora: projections, comma-separated, of q,k,v,o,up,gate,down (default: q,v)")
    p.add_argument("--rslora", action="store_true", help="--kind lora: scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    p.add_argument("--lora-dora", action="store_true",
                   help="--kind lora: DoRA, a learned magnitude per output feature (PEFT's use_dora)")
    p.add_argument("--ia3-targets", help="--kind ia3: comma-separated, of k,v,ff (default: all three)")
    p.add_argument("--prefix-projection", action="store_true",
                   help="--kind prefix: train the prefixes through the reparameterisation MLP (PEFT's "
                   "prefix_projection); the artifact holds them folded into plain prefixes")
    p.add_argument("--prefix-hidden-size", type=int,
                   help="--kind prefix --prefix-projection: the MLP's hidden width (default 512)")
    p.add_argument("--train-layer-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="train per-task layer-norm affines (default: yes for houlsby)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, help=f"learning rate (default: {DEFAULT_LR['adapter']:g} adapters, "
                   f"{DEFAULT_LR['full']:g} --full)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split across DDP processes)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--metric", default="accuracy", choices=METRICS, help="validation metric that picks the best epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="base model dtype (adapters train in float32)")
    p.add_argument("--sites", help="where adapters attach when the site table has no row for the base: 'guess', "
                   "a JSON SiteSpec, or the path of a JSON file holding one")
    p.add_argument("--leave-out", type=_layer_list, default=[], metavar="LAYERS",
                   help="layers without adapters, e.g. 0-4 or 0,1,2 (AdapterDrop, fixed: the backward stops above them)")
    p.add_argument("--adapter-drop", type=int, default=0, metavar="K",
                   help="stochastic AdapterDrop: each step, no adapters in the lowest k layers, k uniform in 0..K "
                        "(for a fixed drop, --leave-out)")
    p.add_argument("--stack-under", action="append", default=[], metavar="ADAPTER.safetensors",
                   help="train on top of this adapter artifact, loaded frozen (repeatable, bottom first): every step "
                        "and evaluation runs Stack(*under, task); the artifact records each by name and sha256")
    p.add_argument("--fusion-of", nargs="+", default=[], metavar="ADAPTER.safetensors",
                   help="train an AdapterFusion named --task over these adapter artifacts (two or more, loaded frozen, "
                        "without layer-norm affines) with the task's head, instead of an adapter; --out is the fusion's "
                        "artifact (load it with load_fusion after its members)")
    p.add_argument("--checkpoint-steps", type=int, default=100, help="checkpoint every N steps too (0: epoch ends only)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the last checkpoint after a successful run (default: removed; --full's is hundreds of MB)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true",
                   help="print nothing while training (no bars, no per-epoch lines; transformers' loading bar too)")
    p.set_defaults(func=run)


def _register_predict(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict a data file with one or more trained artifacts (CSV or JSON Lines out)",
        description="Every input row through every ARTIFACT, in mixed batches (one forward pass holds rows "
        "for several adapters). Writes one record per (row, artifact): row, adapter, label, score "
        "(token tasks: tokens, tags). A --full artifact (with OUT.base.safetensors beside it) is "
        "predicted on its own.",
    )
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifact .safetensors files")
    p.add_argument("--base", required=True, help="the base model the artifacts were trained on")
    p.add_argument("--data", required=True, help="inputs: .csv, .tsv, .jsonl, or a datasets folder (labels ignored)")
    p.add_argument("--out", required=True, help="predictions file: .csv or .jsonl")
    _data_columns(p)
    _inference_options(p)
    p.set_defaults(func=run_predict)


def _register_evaluate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a trained artifact on a labelled file: accuracy, macro-F1, per-class report",
        description="Accuracy, macro-F1, loss and per-class precision / recall / F1 / support of ARTIFACT "
        "on --data (labels must be among the artifact's). A --full artifact reads OUT.base.safetensors too.",
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact .safetensors file")
    p.add_argument("--base", required=True, help="the base model the artifact was trained on")
    p.add_argument("--data", required=True, help="labelled data: .csv, .tsv, .jsonl, or a datasets folder")
    p.add_argument("--json", help="also write the scores as JSON to this file ('-': print JSON instead of the table)")
    _data_columns(p)
    p.add_argument("--label-column", default="label")
    p.add_argument("--tags-column", default="tags")
    _inference_options(p)
    p.set_defaults(func=run_evaluate)


def _inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    p.add_argument("--max-length", type=int, default=128, help="tokens per input (longer inputs are truncated)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="base model dtype")
    p.add_argument("--threads", type=int, help="CPU threads for torch")


def _error(command: str, e: BaseException) -> int:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, KeyError) and message.startswith(("'", '"')):
        message = message[1:-1]
    print(f"adapterkit {command}: error: {message}", file=sys.stderr)
    return 2


def _warn(command: str, message: str) -> None:
    print(f"adapterkit {command}: warning: {message}", file=sys.stderr)


def _check_train_options(args: argparse.Namespace) -> None:
    """Refuse options the chosen mode would ignore, warn about ones that do nothing here."""
    if args.full or args.fusion_of:
        mode = "--full trains the whole model" if args.full else "--fusion-of trains a fusion of existing adapters"
        given = [flag for key, flag in _ADAPTER_OPTIONS.items() if getattr(args, key) is not None]
        given += ["--rslora"] if args.rslora else []
        given += ["--lora-dora"] if args.lora_dora else []
        given += ["--prefix-projection"] if args.prefix_projection else []
        given += ["--prefix-hidden-size"] if args.prefix_hidden_size is not None else []
        given += ["--leave-out"] if args.fusion_of and args.leave_out else []
        if given:
            raise ValueError(f"{mode}, not an adapter: {', '.join(given)} would be ignored; "
                             f"drop them or drop {'--full' if args.full else '--fusion-of'}")
    if args.validation_split and args.validation and os.path.isfile(args.validation):
        _warn("train", f"--validation-split applies to datasets data; {args.validation} is a file, so it is ignored")
    if args.split != "train" and os.path.isfile(args.data):
        _warn("train", f"--split applies to datasets data; {args.data} is a file, so it is ignored")
    if args.bottleneck_size is not None and args.reduction_factor is not None:
        raise ValueError("give --bottleneck-size or --reduction-factor, not both")


def _kind_options(args: argparse.Namespace) -> dict:
    """The LoRA / IA3 / prefix flags as AdapterConfig options; a flag of another kind is an error, not ignored."""
    kind = args.kind or "houlsby"
    lora = {"--lora-r": args.lora_r, "--lora-alpha": args.lora_alpha, "--lora-targets": args.lora_targets,
            "--rslora": args.rslora or None, "--lora-dora": args.lora_dora or None}
    given = [flag for flag, value in lora.items() if value is not None]
    if given and kind != "lora":
        raise ValueError(f"{', '.join(given)} need --kind lora (got --kind {kind})")
    if args.ia3_targets is not None and kind != "ia3":
        raise ValueError(f"--ia3-targets needs --kind ia3 (got --kind {kind})")
    prefix = [flag for flag, value in (("--prefix-projection", args.prefix_projection or None),
                                       ("--prefix-hidden-size", args.prefix_hidden_size)) if value is not None]
    if prefix and kind != "prefix":
        raise ValueError(f"{', '.join(prefix)} need --kind prefix (got --kind {kind})")
    if kind == "prefix":
        return {"prefix_projection": args.prefix_projection, "prefix_hidden_size": args.prefix_hidden_size}
    if kind == "lora":
        if args.lora_r is not None and args.bottleneck_size is not None:
            raise ValueError("give --lora-r or --bottleneck-size, not both")
        if args.lora_r is not None:
            args.bottleneck_size = args.lora_r
        return {"alpha": args.lora_alpha, "targets": args.lora_targets, "rslora": args.rslora, "dora": args.lora_dora}
    if kind == "ia3":
        return {"targets": args.ia3_targets}
    return {}


def _layer_list(text: str) -> list[int]:
    """``"0-4,7"`` -> [0, 1, 2, 3, 4, 7]."""
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first or last - first > 10_000:
                raise ValueError
            layers.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 0-4 or 0,1,2; got {text!r}") from None
    return layers


def run(args: argparse.Namespace) -> int:
    """Run ``adapterkit train``; errors are one line on stderr and exit status 2."""
    import torch

    from ..artifact import ArtifactError
    from ..data import DataError
    from ..sites import parse_sites
    from . import TrainConfig, TrainingInterrupted, describe, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _check_train_options(args)
        from ..config import AdapterConfig

        adapter = None
        if not args.full and not args.fusion_of:
            adapter = AdapterConfig(
                kind=args.kind or "houlsby", bottleneck_size=args.bottleneck_size,
                reduction_factor=args.reduction_factor, activation=args.activation or "gelu",
                dropout=args.dropout or 0.0, train_layer_norms=args.train_layer_norms, leave_out=args.leave_out,
                **_kind_options(args),
            )
        config = TrainConfig(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay, max_length=args.max_length, seed=args.seed, full=args.full,
            metric=args.metric, device=args.device, dtype=args.dtype, checkpoint_steps=args.checkpoint_steps,
            progress=not args.no_progress, keep_checkpoints=args.keep_checkpoints, adapter_drop=args.adapter_drop,
        )
        options = {
            "task_type": args.task_type, "text_column": args.text_column, "text_pair_column": args.text_pair_column,
            "label_column": args.label_column, "tokens_column": args.tokens_column, "tags_column": args.tags_column,
            "encoding": args.encoding, "split": args.split,
        }
        if args.task_type is not None and TASKS[args.task_type].generative:
            options.update(prompt_column=args.prompt_column, response_column=args.response_column,
                           messages_column=args.messages_column)
        if args.validation_split:
            options["validation_split"] = args.validation_split
        result = train(
            args.base, args.data, args.task, args.out, validation=args.validation, kind=args.kind or "houlsby",
            adapter=adapter, config=config, resume=args.resume, data_options=options,
            sites=parse_sites(args.sites), stack_under=args.stack_under, fusion_of=args.fusion_of,
        )
    except TrainingInterrupted as e:
        print(f"adapterkit train: interrupted: {e}", file=sys.stderr)
        return 130
    except (DataError, ArtifactError, ValueError, OSError, KeyError) as e:
        return _error("train", e)
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(result))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Run ``adapterkit predict``; errors are one line on stderr and exit status 2."""
    import torch

    from ..artifact import ArtifactError
    from ..data import DataError
    from .predict import load_trained, predict, read_inputs, task_type_of, write_predictions

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.batch_size < 1 or args.max_length < 1:
            raise ValueError("--batch-size and --max-length must be >= 1")
        model, names, tokenizer = load_trained(args.artifacts, args.base, device=args.device, dtype=args.dtype)
        task_type = task_type_of(model, names)
        examples = read_inputs(args.data, task_type, text_column=args.text_column, text_pair_column=args.text_pair_column,
                               tokens_column=args.tokens_column, split=args.split, encoding=args.encoding)
        records = predict(model, names, tokenizer, examples, task_type=task_type, batch_size=args.batch_size,
                          max_length=args.max_length)
        count = write_predictions(args.out, records)
    except (DataError, ArtifactError, ValueError, OSError, KeyError) as e:
        return _error("predict", e)
    print(f"{count} predictions ({len(examples)} rows x {len(names)} artifacts: {', '.join(names)}) -> {args.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``adapterkit evaluate``; errors are one line on stderr and exit status 2."""
    import json

    import torch

    from ..artifact import ArtifactError
    from ..atomic_io import atomic_write_text
    from ..data import DataError
    from .predict import format_report, load_trained, score_file

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.batch_size < 1 or args.max_length < 1:
            raise ValueError("--batch-size and --max-length must be >= 1")
        model, (name,), tokenizer = load_trained([args.artifact], args.base, device=args.device, dtype=args.dtype)
        options = {"text_column": args.text_column, "text_pair_column": args.text_pair_column,
                   "label_column": args.label_column, "tokens_column": args.tokens_column,
                   "tags_column": args.tags_column, "split": args.split, "encoding": args.encoding}
        scores = score_file(model, name, tokenizer, args.data, batch_size=args.batch_size, max_length=args.max_length,
                            data_options=options)
        text = json.dumps(scores, indent=1) + "\n"
        if args.json and args.json != "-":
            atomic_write_text(args.json, text)
    except (DataError, ArtifactError, ValueError, OSError, KeyError) as e:
        return _error("evaluate", e)
    print(text if args.json == "-" else format_report(scores), end="")
    return 0
