#!/usr/bin/env bash
# Create ./.venv (if needed) and install this package with its test, docs and dev (ruff) extras.
# torch/torchvision are pinned to releases that pip can install on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # Debian/Ubuntu ship venv's ensurepip separately: without it "python3 -m venv" fails half-way
  if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "setup_env.sh: $PYTHON cannot create a virtual environment (no venv/ensurepip module); install it, e.g. on Debian/Ubuntu: apt-get install python3-venv" >&2
    exit 1
  fi
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.supcon-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install --quiet -e ".[test,docs,dev]"
  touch "$stamp"
fi
