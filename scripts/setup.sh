#!/usr/bin/env bash
# Set up everything orch needs on a Debian machine, from nothing but Python.
# Idempotent: a second run only checks. Used by scripts/demo.sh and scripts/test.sh.
#   - Debian packages (when missing, and only as root): a C toolchain, OpenSSH's sshd,
#     iproute2 for network-namespace nodes, python3-venv
#   - PostgreSQL (root only): installed when missing, its cluster started when down
#   - Chromium and chromium-driver (root only) for the dashboard's browser test
#   - a virtualenv in .venv with orch and its dev extra installed (editable)
#   - the C side in worker_native/ built with make
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

missing=()
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
command -v make >/dev/null || missing+=(make)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v ip >/dev/null || missing+=(iproute2)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# PostgreSQL for the sink and store tests: a system service, so only as root on Debian;
# elsewhere the tests that need it skip, saying why.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  done_=""
  if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || ! command -v pg_lsclusters >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    done_=" (installed)"
  fi
  if [ -z "$(pg_lsclusters --no-header)" ]; then
    pg_createcluster "$(ls /usr/lib/postgresql | sort -V | tail -n 1)" main >/dev/null
  fi
  read -r pg_version pg_cluster pg_port pg_status _ < <(pg_lsclusters --no-header | head -n 1)
  if [ "${pg_status%%,*}" != online ]; then
    pg_ctlcluster "$pg_version" "$pg_cluster" start >/dev/null
    done_="${done_:+ (installed, started)}"
    done_="${done_:- (started)}"
  fi
  say "postgresql $pg_version/$pg_cluster running on port $pg_port$done_"
else
  say "postgresql: skipped (installing and starting it needs root on Debian); its tests will skip"
fi

# Chromium and its WebDriver for the dashboard's browser test: root only, like PostgreSQL;
# without them that test skips, saying why.
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  say "chromium: $(chromium --version 2>/dev/null | head -n 1)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  say "chromium: installed $(chromium --version 2>/dev/null | head -n 1)"
else
  say "chromium: skipped (installing it needs root on Debian); the dashboard's browser test will skip"
fi

if [ ! -x .venv/bin/python ]; then
  say "making the virtualenv .venv"
  python3 -m venv .venv
fi
stamp=.venv/.orch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing orch and its dev tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

if [ -f worker_native/Makefile ]; then
  make -s -C worker_native
fi
say "ready"
