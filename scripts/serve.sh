#!/usr/bin/env bash
# Set up the embedded default (SQLite, ./vesalius-data, built-in CT model) and start the node.
# Arguments go to `vesalius serve`, e.g. scripts/serve.sh --destination PACS@10.0.0.5:104
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/vesalius serve "$@"
