#!/usr/bin/env bash
# Prepare, here (PyPI reachable), the wheels the bare GPU machine lacks: scripts/gpu-wheels.txt for CPython
# 3.12 on manylinux x86_64, into .whl/ (git-ignored; carried to the machine beside the working tree, which
# may total 64 MiB). Then, there: python3 scripts/gpu_check.py (docs/performance.md, "The device check").
# bitsandbytes is left out on purpose: its wheel alone is ~43 MB; the check quantizes with torchao.
# Usage: scripts/gpu_wheels.sh            (DEST=folder to write elsewhere; PYTHON=an interpreter with pip)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PYTHON:-python3}
LIMIT_MB=${LIMIT_MB:-16}
rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" -r scripts/gpu-wheels.txt
count=$(ls "$DEST"/*.whl | wc -l)
wanted=$(grep -cv '^\s*\(#\|$\)' scripts/gpu-wheels.txt)
if [ "$count" != "$wanted" ]; then
  echo "gpu_wheels: $count wheels in $DEST, $wanted asked for" >&2
  exit 1
fi
size_kb=$(du -sk "$DEST" | cut -f1)
ls -l "$DEST"
echo "gpu_wheels: $count wheels, $((size_kb / 1024)) MiB in $DEST"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "gpu_wheels: more than $LIMIT_MB MiB: the working tree and the wheels must travel in 64 MiB" >&2
  exit 1
fi
