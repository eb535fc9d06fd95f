#!/usr/bin/env bash
# The checks for a machine with a CUDA GPU, in one run: the device tests, then the benchmarks of the
# adapter kinds on the GPU (float32 and bfloat16). Uses the machine's own python3 (its torch with CUDA
# and transformers 5.x) and adapterkit from src/; writes log.txt and JSON results into $OUT (default
# out/device). PEFT is taken from WHEELS (a folder of wheels, e.g. peft 0.21.2) when given.
#   scripts/device-check.sh                    # everything, under 10 min on one H200
#   STEPS="tests kinds" scripts/device-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/device}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-site "$WHEELS"/*.whl \
    && export PYTHONPATH="/tmp/device-site:$PYTHONPATH"
fi
steps=${STEPS:-"tests kinds overhead compare"}
status=0
run() {  # run NAME SECONDS CMD...: output appended to $out/log.txt as it comes, stopped after SECONDS
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/log.txt"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt" | tail -n 25 || { echo "   $name failed"; status=1; }
  echo "   $name took $((SECONDS - started)) s" | tee -a "$out/log.txt"
}
python3 - <<'EOF' | tee "$out/machine.txt"
import peft, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
for step in $steps; do
  case $step in
    tests)  # every CUDA case of the device tests, and the training loop on the GPU with a bf16 base
      run tests 240 python3 -m pytest -q -p no:cacheprovider tests/core/test_devices.py tests/train/test_train.py -k "device" ;;
    kinds)  # LoRA / IA3 / mixed kinds beside PEFT, MiniLM's shape and BERT-base, 32 (64) x 128
      for dtype in ${DTYPES:-float32 bfloat16}; do
        run "kinds_$dtype" 150 python3 benchmarks/kinds_compare.py --device cuda --dtype "$dtype" --models minilm_shape,bertbase \
          --rounds 21 --tokens 128 --json "$out/kinds_$dtype.json"
      done ;;
    overhead)  # the serving shape (16 x 24 over 16 adapters, of one kind and of four) and mixed batches
      for dtype in ${DTYPES:-float32 bfloat16}; do
        run "overhead_$dtype" 120 python3 benchmarks/overhead.py --device cuda --dtype "$dtype" --model minilm_shape \
          --rounds 15 --json "$out/overhead_$dtype.json"
      done ;;
    compare)  # inference, storage and training steps beside PEFT (the adapters library needs transformers 4.57)
      run compare 240 python3 benchmarks/compare.py --device cuda --models minilm_shape bertbase \
        --measures ${COMPARE_MEASURES:-train storage} --rounds 15 --mixed-rounds 9 --steps 20 --train-rounds 1 \
        --json "$out/compare.json" ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
