"""``adapterkit convert`` and ``adapterkit export``: PEFT / adapters-library folders to one artifact, and back.

    adapterkit convert ./peft-folder --base bert-base-uncased --out task.safetensors
    adapterkit convert hf:org/name@main --base bert-base-uncased --out task.safetensors
    adapterkit export task.safetensors --base bert-base-uncased --to peft --out exported/

Conversions are exact or refused (``adapterkit.interop``). The converted artifact records where it came
from under the metadata key ``source`` (format, that library's version, the ``hf:`` reference or the
folder's base name: never a local path). ``export`` writes the folder and a README.md adapter card.
Errors are one line on stderr, exit status 2, and leave no output behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import AdapterModel

TARGETS = ("peft", "adapters")


def register(subparsers: Any) -> None:
    """Add the ``convert`` and ``export`` subcommands to the ``adapterkit`` parser."""
    p = subparsers.add_parser(
        "convert",
        help="convert a PEFT (LoRA, IA3) or adapters-library (bottleneck) folder into one adapterkit artifact",
        description="Read SRC exactly into an adapterkit adapter for the --base model (or refuse, naming the "
        "option that has no exact equivalent) and write it as one .safetensors artifact.",
    )
    p.add_argument("source", metavar="SRC", help="a folder saved by PEFT or the adapters library, or hf:org/name[@revision]")
    p.add_argument("--base", required=True, help="the base model the adapter was trained on: a Hugging Face folder or id")
    p.add_argument("--out", required=True, help="artifact to write (.safetensors)")
    p.add_argument("--name", help="the adapter's name (default: the name saved in SRC, else the --out file's stem)")
    p.add_argument("--labels", help="a head's label names, comma-separated, in logit order "
                   "(default: those SRC saved, else the base config's id2label, else LABEL_i)")
    p.set_defaults(func=run_convert)

    p = subparsers.add_parser(
        "export",
        help="export an adapterkit artifact as a PEFT or adapters-library folder (with a README.md card)",
        description="Load TASK on the --base model and write it in the format of --to: LoRA and IA3 adapters "
        "to PEFT, the bottleneck kinds (houlsby, pfeiffer, serial_attention, parallel) to the adapters "
        "library; heads too. Writes a README.md adapter card in DIR.",
    )
    p.add_argument("artifact", metavar="TASK", help="an adapterkit artifact (.safetensors)")
    p.add_argument("--base", required=True, help="the base model TASK was trained on: a Hugging Face folder or id")
    p.add_argument("--to", required=True, metavar="{peft,adapters}", help="the library to export for")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist, or be empty)")
    p.set_defaults(func=run_export)


def _error(command: str, e: BaseException) -> int:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"adapterkit {command}: error: {message}", file=sys.stderr)
    return 2


def _load_base(base: str) -> AdapterModel:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from ..model import AdapterModel

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the weight-loading bar: noise in front of a one-line answer
    try:
        base_model = AutoModel.from_pretrained(base)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return AdapterModel(base_model).eval()


# -- convert -------------------------------------------------------------------------------------


def _resolve_source(source: str) -> tuple[Path, str, dict[str, Any]]:
    """(local path, its portable name, extra provenance) of SRC; checked before the base is loaded."""
    if source.startswith("hf:"):
        from .hf import resolve_hf

        path = resolve_hf(source)
        folder = path if path.is_dir() else path.parent
        return path, source, {"commit": folder.name}  # the snapshot folder is named by its commit
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such folder")
    if not path.is_dir():
        raise ValueError(f"{source}: a file, not a folder; convert reads the folder PEFT or the adapters library "
                         "saved (the one holding adapter_config.json)")
    return path, path.resolve().name, {}


def _provenance(fmt: str, read: dict[str, Any], source_name: str, extra: dict[str, Any], base: str) -> dict[str, Any]:
    """The ``source`` metadata: format, version, where from, and the base model the source names (only
    a portable id; a local base folder by its base name)."""
    from .card import base_name, portable_id

    version = read.get("peft_version") if fmt == "peft" else read.get("version")
    record: dict[str, Any] = {"format": fmt, "version": version, "source": source_name, **extra}
    if fmt == "peft":
        record["peft_type"] = read.get("peft_type")
    claimed = read.get("base_model_name_or_path") if fmt == "peft" else read.get("model_name")
    record["base_model"] = portable_id(claimed)
    if portable_id(base) is None:
        record["base_folder"] = base_name(str(Path(base).resolve()))
    return record


def convert_to_artifact(source: str, base: str, out: str | os.PathLike, name: str | None = None,
                        labels: list[str] | None = None, default_name: str | None = None) -> tuple[str, str, str]:
    """Convert ``source`` (a PEFT or adapters-library folder, or ``hf:org/name[@revision]``) for the
    ``base`` model into the artifact ``out``; returns (source format, adapter kind, adapter name).

    The adapter's name: ``name``, else the one saved in the source, else ``default_name``, else the
    ``out`` file's stem. ``adapterkit convert`` and ``adapterkit hub push`` of a folder both run this.
    Raises InteropError, ArtifactError, ValueError, OSError or KeyError; nothing is written then."""
    from ..artifact import build_metadata, write_artifact
    from . import detect_format, read_foreign
    from .card import portable_id
    from .converted import install
    from .module_map import InteropError

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the artifact's file name (.safetensors)")
    path, source_name, extra = _resolve_source(source)
    if path.is_dir():
        fmt = detect_format(path)
        if fmt is None:
            raise InteropError(f"{source}: not a PEFT or adapters-library folder (no adapter_config.json "
                               "that either library wrote)")
    else:  # an hf: repository holding one adapterkit artifact already: re-saved with its provenance
        fmt = "adapterkit"
    model = _load_base(base)
    if fmt == "adapterkit":
        name = model.load_adapter(path, name=name)
        read: dict[str, Any] = {}
    else:
        converted = read_foreign(path, model, labels)
        name = name or converted.name or default_name or out.name.removesuffix(".safetensors")
        install(model, converted, name)
        read = converted.source
    adapter = model._get(name)
    fingerprint = dict(model.fingerprint())
    fingerprint["name_or_path"] = portable_id(base) or ""  # never a local path
    meta = build_metadata(name, adapter.config, model.hidden_size, adapter.task, adapter.head_spec, fingerprint,
                          description=f"converted from {fmt} ({source_name})")
    meta["source"] = _provenance(fmt, read, source_name, extra, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_artifact(out, adapter.state_dict(), meta)  # atomic: a failure leaves no file
    return fmt, adapter.config.kind, name


def run_convert(args: argparse.Namespace) -> int:
    """Run ``adapterkit convert``; errors are one line on stderr and exit status 2."""
    from ..artifact import ArtifactError
    from .module_map import InteropError

    try:
        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        fmt, kind, name = convert_to_artifact(args.source, args.base, args.out, args.name, labels)
    except (InteropError, ArtifactError, ValueError, OSError, KeyError) as e:
        return _error("convert", e)
    print(f"{args.source} ({fmt}, {kind}) -> {args.out} (adapter {name!r})")
    return 0


# -- export --------------------------------------------------------------------------------------


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose another or remove it")


def run_export(args: argparse.Namespace) -> int:
    """Run ``adapterkit export``; errors are one line on stderr and exit status 2."""
    from ..artifact import ArtifactError, read_metadata
    from ..atomic_io import atomic_write_text
    from . import export
    from .card import adapter_card, card_base_id
    from .module_map import InteropError

    out = Path(args.out)
    staging: Path | None = None
    try:
        if args.to not in TARGETS:
            raise ValueError(f"--to must be one of {', '.join(TARGETS)}; got {args.to!r}")
        if not Path(args.artifact).is_file():
            raise FileNotFoundError(f"{args.artifact}: no such artifact file")
        meta = read_metadata(args.artifact)  # a bad file fails before the base model is loaded
        _check_out_dir(out)
        model = _load_base(args.base)
        name = model.load_adapter(args.artifact)  # checks the base fingerprint
        base_id = card_base_id(meta, args.base)
        if base_id:  # the exported config then names a base any machine can load
            model.base.config._name_or_path = base_id
        out.parent.mkdir(parents=True, exist_ok=True)
        # written beside DIR and renamed into place at the end, so a failure leaves nothing at DIR
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        export(model, name, staging, to=args.to)
        atomic_write_text(staging / "README.md", adapter_card(meta, args.to, out.name, base_id))
        _check_out_dir(out)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
        staging = None
    except (InteropError, ArtifactError, ValueError, OSError, KeyError) as e:
        return _error("export", e)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{args.artifact} -> {args.out} ({args.to}, adapter {name!r}; README.md card)")
    return 0
