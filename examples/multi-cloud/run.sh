#!/usr/bin/env bash
# One family across a private pool and five clouds (EC2, OpenStack, GCE, Azure,
# DigitalOcean), each through libcloud's stock driver against a protocol peer on this
# machine whose instances are real sshd nodes: register, plan, spawn, run the primes job
# across every cloud, check its total against a direct computation, stop everything.
# Runs on a scratch copy of this workspace; always stops every node and every peer.
# The last line says what happened; the exit code is non-zero unless the result is exact.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${ORCH_VENV:-$REPO/.venv}/bin
PY="$BIN/python"
INPUT_END=${INPUT_END:-30000000}  # the job: count_primes over 0:INPUT_END (long enough for every agent to dial in)

WORK=$(mktemp -d /tmp/orch-multi-cloud.XXXXXX)
WS="$WORK/ws"
PEERS_PID=""

cleanup() {
    local status=$?
    set +e
    if [ -d "$WS/.orch" ]; then
        echo "== orch stop --all"
        orch stop --all -q
    fi
    if [ -n "$PEERS_PID" ]; then
        kill -TERM "$PEERS_PID" 2>/dev/null
        wait "$PEERS_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

orch() { "$PY" -m orchestrator "$@"; }
step() { echo; echo "== orch $*"; orch "$@"; }

# The workspace: this folder's YAML and the sample release.
mkdir -p "$WS/releases"
cp -r "$HERE/orch.yaml" "$HERE/providers" "$HERE/node_families" "$WS/"
cp -r "$REPO/releases/primes" "$WS/releases/primes"
rm -rf "$WS/releases/primes/build"
export ORCH_WORKSPACE="$WS"
export COLUMNS=${COLUMNS:-160}

# The five clouds' peers (tests/peers/): each writes its registration into providers/
# as docs/clouds/ says, plus this folder's clouds.json; env.sh holds what the
# registrations' env: references and the test adapters need.
cd "$REPO"
PYTHONPATH="$REPO" "$PY" -m tests.peers.clouds --folder "$WORK/peers" --workspace "$WS" \
    --extra "$HERE/clouds.json" >"$WORK/peers.log" 2>&1 &
PEERS_PID=$!
for _ in $(seq 600); do
    grep -q '^ready' "$WORK/peers.log" 2>/dev/null && break
    kill -0 "$PEERS_PID" 2>/dev/null || { cat "$WORK/peers.log"; echo "multi-cloud: the peers did not start"; exit 1; }
    sleep 0.1
done
grep -q '^ready' "$WORK/peers.log" || { cat "$WORK/peers.log"; echo "multi-cloud: the peers did not start"; exit 1; }
# shellcheck disable=SC1091
. "$WORK/peers/env.sh"
cd "$WS"
echo "peers (pid $PEERS_PID) ready; workspace $WS"

step validate
step provider list
step plan workers
step spawn workers -q
step nodes

echo; echo "== orch job run primes:count_primes --input 0:$INPUT_END"
orch job run primes:count_primes --input "0:$INPUT_END" --json >"$WORK/job.json"
JOB=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["job"])' "$WORK/job.json")
orch job result "$JOB" --out "$WORK/result.txt"
orch nodes --json >"$WORK/nodes.json"
orch job status "$JOB" --json >"$WORK/status.json"

SUMMARY=$("$PY" - "$WORK/result.txt" "$WORK/nodes.json" "$WORK/status.json" "$INPUT_END" <<'EOF'
import json, sys
from tests.helpers.primes import primes_below  # the direct computation: a sieve (env.sh puts the repo on the path)
result, nodes, status, end = open(sys.argv[1]).read().split(), json.load(open(sys.argv[2])), \
    json.load(open(sys.argv[3])), int(sys.argv[4])
total = sum(int(line) for line in result)
expected = primes_below(end)
ready = {n["id"]: n["provider"] for n in nodes if n["state"] == "ready"}
providers = sorted(set(ready.values()))
worked = sorted({ready[n] for n in status["sizes"] if n in ready})  # the nodes that ran tasks
line = f"{len(ready)} nodes on {len(providers)} providers ({', '.join(providers)}), "
if total != expected:
    print(line + f"result WRONG: {total} primes below {end}, expected {expected}")
elif worked != providers:
    print(line + f"result exact, but only {', '.join(worked)} ran tasks")
else:
    print(line + "result exact")
sys.exit(0 if total == expected and worked == providers else 1)
EOF
) || { echo "multi-cloud: $SUMMARY"; exit 1; }

step stop workers -q
trap - EXIT
kill -TERM "$PEERS_PID" 2>/dev/null
wait "$PEERS_PID" 2>/dev/null || true
rm -rf "$WORK"
echo "multi-cloud: $SUMMARY"
