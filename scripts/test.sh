#!/usr/bin/env bash
# The test suite, against transformers 5.x (.venv) and 4.57.x (.venv-tf4), each in its own virtual
# environment, created on first use. Extra arguments go to pytest (e.g. -m "not slow", -k mixed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || scripts/setup.sh .venv
[ -x .venv-tf4/bin/pytest ] || scripts/setup.sh .venv-tf4 'transformers==4.57.6'
scripts/setup-hub-backends.sh   # PostgreSQL for the shared-hub tests, where missing
status=0
for venv in .venv .venv-tf4; do
  echo "== pytest with $("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)')"
  "$venv/bin/python" -m pytest -q "$@" || status=$?
done
exit $status
