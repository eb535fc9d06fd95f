"""The ``adapterkit`` command line: one entry point, subcommands registered by each part."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each part of the library that has commands exposes ``register(subparsers)``; imported lazily so that
# ``adapterkit --help`` stays fast and a part's optional dependencies are only needed when it is used.
_COMMAND_MODULES = ("adapterkit.training.cli", "adapterkit.hub.cli", "adapterkit.serve.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterkit", description="Bottleneck adapters for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("adapterkit"):
                continue  # that part is not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
