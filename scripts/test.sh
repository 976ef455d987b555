#!/usr/bin/env bash
# Set everything up, then run the whole test suite with the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache  # the rooms and their contracts: .importlinter
exec .venv/bin/pytest "$@"
