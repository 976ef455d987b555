#!/usr/bin/env bash
# Set everything up, then run the main job end to end in this workspace (the local
# provider): validate, upload the sample release, spawn 4 nodes that build it from
# source, run the primes job across them (C work through the embedded scheduler),
# check its result against a direct computation, and stop the nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
orch() { .venv/bin/orch "$@"; }
trap 'orch stop --all -q >/dev/null 2>&1 || true' EXIT   # never leave nodes behind
N=5000000
set -x
orch validate
orch release upload releases/primes
orch provider check local
orch spawn workers
orch nodes
job=$(orch job run primes:count_primes --input "0:$N" --family workers --target-task-seconds 0.1 --json \
      | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["job"])')
orch job status "$job"
total=$(orch job result "$job" | .venv/bin/python -c 'import sys; print(sum(int(x) for x in sys.stdin.read().split()))')
direct=$(.venv/bin/python - "$N" <<'PY'
import sys
n = int(sys.argv[1])
sieve = bytearray([1]) * n
sieve[:2] = b"\0\0"
for i in range(2, int(n ** 0.5) + 1):
    if sieve[i]:
        sieve[i * i::i] = bytearray(len(range(i * i, n, i)))
print(sum(sieve))
PY
)
set +x
echo "primes below $N: $total across the fleet, $direct computed directly"
[ "$total" = "$direct" ] || { echo "MISMATCH" >&2; exit 1; }
set -x
orch stop workers
