#!/usr/bin/env bash
# Ordered failover across three providers: private (local nodes, 3 at most), public
# (network-namespace nodes as root, else more local nodes; 4 at most) and aws (the EC2
# API, served on 127.0.0.1 by moto).  Runs on a scratch copy of this workspace and
# always stops every node and the moto server on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${ORCH_VENV:-$REPO/.venv}/bin
PY="$BIN/python"

WORK=$(mktemp -d /tmp/orch-multi-cloud.XXXXXX)
WS="$WORK/ws"
MOTO_PID=""

cleanup() {
    local status=$?
    set +e
    if [ -d "$WS/.orch" ]; then
        echo "== orch stop --all"
        orch stop --all -q
    fi
    if [ -n "$MOTO_PID" ]; then
        kill "$MOTO_PID" 2>/dev/null
        wait "$MOTO_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

orch() { "$PY" -m orchestrator "$@"; }
step() { echo; echo "== orch $*"; orch "$@"; }

# The workspace: this folder's YAML, the sample release, and the moto adapter's environment.
mkdir -p "$WS/releases"
cp -r "$HERE/orch.yaml" "$HERE/providers" "$HERE/node_families" "$WS/"
cp -r "$REPO/releases/primes" "$WS/releases/primes"
rm -rf "$WS/releases/primes/build"
export ORCH_WORKSPACE="$WS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export ORCH_DRIVER_PLUGINS="ec2moto=tests.moto_ec2:MotoEC2NodeDriver"
export AWS_ACCESS_KEY_ID=AKIAEXAMPLEFAKEKEY00 AWS_SECRET_ACCESS_KEY=example-fake-secret
export COLUMNS=${COLUMNS:-150}

# As root, the public cloud is network-namespace nodes on a subnet nothing here uses.
if [ "$(id -u)" = 0 ] && ip netns list >/dev/null 2>&1; then
    for n in $(shuf -i 100-199 -n 20); do
        if ! ip -o addr | grep -q " 10\.214\.$n\." && ! ip route | grep -q "^10\.214\.$n\."; then
            cat >"$WS/providers/public.yaml" <<EOF
# A public cloud stand-in: nodes in network namespaces on a bridge of their own.
driver: netns
labels: [public]
priority: 50
max_nodes: 4
options: {subnet: 10.214.$n.0/24, bridge: orchmc$n}
prices: {netns-1: 0.011, netns-2: 0.022, netns-4: 0.044}
EOF
            break
        fi
    done
fi

# moto on a free port, with only its default AMIs loaded (fast DescribeImages).
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
AMIS=$("$PY" -c 'import pathlib, sys; from tests.moto_ec2 import amis_file; print(amis_file(pathlib.Path(sys.argv[1])))' "$WORK")
MOTO_AMIS_PATH="$AMIS" "$BIN/moto_server" -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
"$PY" - "$PORT" <<'EOF'
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/moto-api/", timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("moto_server did not start")
EOF
sed -i "s/port: 5000/port: $PORT/" "$WS/providers/aws.yaml"
echo "moto_server pid $MOTO_PID on 127.0.0.1:$PORT; workspace $WS"
echo "public provider: $(sed -n 's/^driver: //p' "$WS/providers/public.yaml")"

step provider list
step plan workers
step spawn workers -q
step nodes
step plan workers --count 8
step spawn workers --count 8 -q
step nodes
