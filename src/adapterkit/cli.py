"""The ``adapterkit`` command line: one entry point, subcommands registered by each part."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class CommandPart:
    """A part of the library that adds subcommands: its module exposes ``register(subparsers)``.

    ``commands`` and ``extra`` are declared here, not discovered, so that when the module cannot be
    imported (its optional dependencies are missing) its commands still show in ``--help`` and say
    which extra to install instead of vanishing.
    """

    module: str
    commands: tuple[str, ...]
    extra: str


# Imported lazily so that ``adapterkit --help`` stays fast and a part's optional dependencies are only
# needed when it is used.
COMMAND_PARTS = (
    CommandPart("adapterkit.training.cli", ("train", "predict", "evaluate"), "train"),
    CommandPart("adapterkit.hub.cli", ("hub",), "hub"),
    CommandPart("adapterkit.serve.cli", ("serve",), "serve"),
    CommandPart("adapterkit.interop.cli", ("convert", "export"), "all"),
)


def _unavailable(part: CommandPart, error: ImportError) -> str:
    missing = error.name or ""
    if missing and not missing.startswith("adapterkit"):
        hint = f"install its extra: pip install 'adapterkit[{part.extra}]'"
    else:  # a broken install or a bug, not a missing optional dependency
        hint = "reinstall adapterkit"
    return f"cannot be used: importing {part.module} failed ({type(error).__name__}: {error}); {hint}"


def _register_unavailable(sub: argparse._SubParsersAction, part: CommandPart, error: ImportError) -> None:
    """Commands whose module failed to import: listed in ``--help``; running one prints why, exit 2."""
    reason = _unavailable(part, error)
    for command in part.commands:
        p = sub.add_parser(command, help=f"(unavailable) {reason}", description=reason, add_help=False)

        def fail(args: argparse.Namespace, command: str = command) -> int:
            print(f"adapterkit {command}: {reason}", file=sys.stderr)
            return 2

        p.set_defaults(func=fail, takes_any_arguments=True)  # whatever follows, the answer is why


def build_parser() -> argparse.ArgumentParser:
    """The full parser: every part's subcommands, or a stand-in that explains why a part is missing."""
    parser = argparse.ArgumentParser(prog="adapterkit", description="Bottleneck adapters for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for part in COMMAND_PARTS:
        try:
            module = importlib.import_module(part.module)
        except ImportError as e:
            _register_unavailable(sub, part, e)
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``adapterkit ARGV``; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
