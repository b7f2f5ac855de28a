#!/usr/bin/env bash
# Create .venv and install qsae-lens with its dev tools. torch is installed FIRST and pinned:
# an unpinned torch pulls a multi-GB CUDA build; torch==2.13.0 is the CPU build on this machine.
# The browser tests (feature browser, steering page) drive Debian's headless chromium: installed
# here with apt-get when missing (pip-installed browser drivers cannot download a browser offline).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium + chromium-driver for the browser tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "[setup] chromium/chromedriver not found and apt-get not usable: the browser tests will be skipped" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
