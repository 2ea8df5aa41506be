#!/usr/bin/env bash
# Set up with every extra and run the whole test suite (what CI runs): lint, types, layers, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,ai,ray,postgres
.venv/bin/ruff check .
# mypy cannot follow the editable install's import hook: give it the folders as vesalius.* links
mkdir -p .mypy_path/vesalius
for package in node inference dicom_out; do ln -sfn "../../$package" ".mypy_path/vesalius/$package"; done
.venv/bin/mypy
.venv/bin/lint-imports  # the layering and no-cycle contracts of pyproject.toml [tool.importlinter]
exec .venv/bin/python -m pytest -q "$@"
