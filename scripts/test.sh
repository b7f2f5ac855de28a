#!/usr/bin/env bash
# The README's test command: install everything from scratch, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
ruff check qsae_lens tests examples benchmarks
python -m pytest -q "$@"
