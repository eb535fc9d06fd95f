"""``python -m adapterkit`` and what the command line says when a part's optional dependency is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh interpreter. ``block`` makes those top-level packages
    fail to import (a ``None`` entry in ``sys.modules`` is how Python itself marks a module as
    unimportable), as on a machine where that extra was never installed."""
    setup = "".join(f"sys.modules[{name!r}] = None; " for name in block)
    code = f"import sys; {setup}from adapterkit.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_python_dash_m_adapterkit_runs_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "adapterkit", "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    for command in ("train", "hub", "serve"):
        assert command in out.stdout
    assert "unavailable" not in out.stdout


def test_python_dash_m_adapterkit_passes_arguments_through():
    out = subprocess.run([sys.executable, "-m", "adapterkit", "nonsense"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "invalid choice: 'nonsense'" in out.stderr


@pytest.mark.parametrize("blocked, command, extra", [(("fastapi",), "serve", "serve")])
def test_missing_extra_keeps_the_command_listed_and_says_why(blocked, command, extra):
    helped = run_cli("--help", block=blocked)
    assert helped.returncode == 0, helped.stderr
    listed = [line for line in helped.stdout.splitlines() if line.strip().startswith(command)]
    assert listed, f"{command} vanished from --help:\n{helped.stdout}"

    ran = run_cli(command, "--whatever", "x", block=blocked)
    assert ran.returncode == 2
    assert f"adapterkit {command}: cannot be used" in ran.stderr
    assert f"pip install 'adapterkit[{extra}]'" in ran.stderr
    assert blocked[0] in ran.stderr  # the ImportError's own text names the missing package


@pytest.mark.parametrize("command, flag", [("train", "--base"), ("hub", "search")])
def test_commands_that_import_are_unaffected_by_another_missing_extra(command, flag):
    # The hub's local registry and the train command's parser need no server packages.
    out = run_cli(command, "--help", block=("fastapi", "uvicorn"))
    assert out.returncode == 0, out.stderr
    assert flag in out.stdout
