#!/usr/bin/env bash
# The device check for the CUDA path (docs/performance.md): the suite's gpu tests, then the LISA-7B-shaped
# bench (random weights, no download) eager vs optimised, in bf16 and 4-bit. Results go to $OUT (default
# ./gpu-check). Needs the test environment (scripts/test.sh sets it up) and bitsandbytes for the 4-bit run
# (pip install -e .[quant]). About 5-8 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m gpu tests/test_acceleration.py 2>&1 | tail -30 > "$OUT/gpu_tests.txt"
for quant in none 4bit; do
  timeout 240 "$VENV/bin/lisa-agent" bench --shape 7b --device cuda --quantization "$quant" --runs 20 \
      --reference-runs 3 --new-tokens 8 --compare --json > "$OUT/bench_7b_$quant.json" 2> "$OUT/bench_7b_$quant.err"
done
# Optional, when time is left (compiling SAM ViT-H takes minutes): COMPILE=1 adds torch.compile's effect.
if [ "${COMPILE:-0}" = 1 ]; then
  timeout 600 "$VENV/bin/lisa-agent" bench --shape 7b --device cuda --compile on --runs 20 --mode fast \
      --compare --json > "$OUT/bench_7b_compile.json" 2> "$OUT/bench_7b_compile.err"
fi
tail -n 5 "$OUT"/*.txt
