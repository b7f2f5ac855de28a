#!/usr/bin/env bash
# The README's main-job command: install everything from scratch (torch==2.13.0 pinned first, in
# scripts/setup_env.sh), then run the default precision sweep on the embedded SmolLM2-135M and the
# Python-stdlib corpus. The report lands in qsae_runs/sweep/report.{md,html,json}; re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
qsae sweep --out "${QSAE_SWEEP_OUT:-qsae_runs/sweep}" "$@"
