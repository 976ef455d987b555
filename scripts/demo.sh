#!/usr/bin/env bash
# Set everything up, then run the main job end to end in this workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
orch() { .venv/bin/orch "$@"; }
set -x
orch validate
orch release upload releases/primes
orch release list
orch provider check local
orch family list
