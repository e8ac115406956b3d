#!/usr/bin/env bash
# The documentation site (MkDocs + Material, mkdocs.yml). Sets up ./.venv like the quick start.
#   bash scripts/docs.sh            serve it at http://127.0.0.1:8000, rebuilt on every save
#   bash scripts/docs.sh build      build it into site/ with --strict (what CI runs); extra args go to mkdocs
set -euo pipefail
export NO_MKDOCS_2_WARNING=1  # mkdocs-material prints a banner about its successor on every build
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ "${1:-serve}" = build ]; then
  shift || true
  exec .venv/bin/mkdocs build --strict "$@"
fi
[ "${1:-}" = serve ] && shift
exec .venv/bin/mkdocs serve "$@"
