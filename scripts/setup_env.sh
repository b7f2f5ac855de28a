#!/usr/bin/env bash
# Create .venv and install qsae-lens with its dev tools. torch is installed FIRST and pinned:
# an unpinned torch pulls a multi-GB CUDA build; torch==2.13.0 is the CPU build on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
