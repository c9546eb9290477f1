#!/usr/bin/env bash
# The device check (docs/performance.md, "The device check"): the gpu tests and the LISA-7B-shaped bench in
# bf16 and 4-bit, on a bare GPU machine with its own python3. Prepare the wheels first, here:
# scripts/gpu_wheels.sh. Arguments go to scripts/gpu_check.py (--device cpu rehearses it on the CPU).
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
