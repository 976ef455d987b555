#!/usr/bin/env bash
# Set everything up, then run the main job end to end in this workspace (the local
# provider): validate, upload the sample release, spawn 4 nodes that build it from
# source, run a command across them, and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
orch() { .venv/bin/orch "$@"; }
trap 'orch stop --all -q >/dev/null 2>&1 || true' EXIT   # never leave nodes behind
set -x
orch validate
orch release upload releases/primes
orch release list
orch provider check local
orch spawn workers
orch nodes
orch exec workers -- 'echo "$(cat orch/current/.orch-sha256 | cut -c1-12) built $(ls orch/current/build)"'
orch stop workers
