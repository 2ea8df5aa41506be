#!/usr/bin/env bash
# Set up Vesalius in ./.venv: Debian's DCMTK (peers for tests and operators) and the Python package.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh test,ai
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if ! command -v storescu >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends dcmtk python3-venv >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [[ ",$extras," == *",ai,"* ]]; then
    # The CPU build first, so the range in the 'ai' extra is already satisfied (no multi-GB CUDA download).
    .venv/bin/pip install -q "torch==2.13.0"
fi
if [ -n "$extras" ]; then
    .venv/bin/pip install -q -e ".[$extras]"
else
    .venv/bin/pip install -q -e .
fi
