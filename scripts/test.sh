#!/usr/bin/env bash
# Set up with every extra and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,ai
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
