#!/usr/bin/env bash
# Quick start 1: set up ./.venv and run the whole pipeline on bundled real data (scikit-learn's digits).
# Extra args go to supcon-demo (see: .venv/bin/supcon-demo --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/supcon-demo "$@"
