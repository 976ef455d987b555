#!/usr/bin/env bash
# Mutation testing of orch's invariant modules with mutmut 3, for maintainers (not part of
# scripts/test.sh: a full run takes about an hour on 2 cores).  See docs/mutation.md.
#
#   scripts/mutation.sh [GROUP...]        mutate GROUP's modules, run the unit tests on each mutant
#   scripts/mutation.sh results           list the mutants that survived (or timed out)
#   scripts/mutation.sh show MUTANT       the diff of one mutant
#   scripts/mutation.sh recheck TESTFILE MUTANT...
#                                         after writing TESTFILE (tests/unit/...): does it kill
#                                         these survivors?  (A survivor survived every older
#                                         test, so only the new file can kill it; this runs just
#                                         that file on each, far faster than a group's rerun.)
#
# GROUPs: engine sinks placement releases ssh auth recovery (default: all of them).
# A run exports the committed HEAD (or $ORCH_MUTATION_REV) to a copy ($ORCH_MUTATION_DIR,
# default /tmp/orch-mutation; a run of another commit makes it afresh): the checkout is never
# touched, and mutmut's mutants/ folder and cache live in the copy (kept between runs of one
# commit, so a second run only tests what it has not).  results, show and recheck read the
# copy the last run made, whatever HEAD is now.
# The tests are tests/unit only (fast, no nodes); $ORCH_MUTATION_CHILDREN mutants run at once
# (default 2), at nice 19.  mutmut is installed into .venv on first use (it is not in the
# `dev` extra: `.venv/bin/pip install 'mutmut>=3.3,<4'`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dir=${ORCH_MUTATION_DIR:-/tmp/orch-mutation}
children=${ORCH_MUTATION_CHILDREN:-2}

declare -A groups=(
  [engine]="orchestrator/scheduler/engine.py"
  [sinks]="orchestrator/scheduler/sinks/*.py"
  [placement]="orchestrator/provision/placement.py"
  [releases]="orchestrator/deploy/releases.py orchestrator/deploy/packing.py orchestrator/state/store.py"
  [ssh]="orchestrator/remote/ssh.py"
  [auth]="orchestrator/server/middleware.py orchestrator/server/deps.py orchestrator/server/auth.py"
  [recovery]="orchestrator/provision/recovery.py"
)
# The mutants of each group, as mutmut names them (module.xǁClassǁmethod__mutmut_N,
# module.x_function__mutmut_N): the functions that hold each invariant, not whole files
# (the engine's serving and exec, the store's other tables, the sinks' URL parsing and
# the PostgreSQL sink, which shares _TableSink with SQLite, are left out).
e="orchestrator.scheduler.engine.xǁEngineǁ"
declare -A names=(
  [engine]="${e}_results* ${e}_take* ${e}_pump* ${e}_requeue* ${e}_attempt_failed* ${e}_give_up* ${e}_lose*
            ${e}_port_died* ${e}_store_results* ${e}_write_output* ${e}_commit* ${e}_check_done*"
  [sinks]="orchestrator.scheduler.sinks.file.* orchestrator.scheduler.sinks.sqlite.*
           orchestrator.scheduler.sinks.base.xǁSinkǁ* orchestrator.scheduler.sinks.base.xǁ_TableSinkǁ*
           orchestrator.scheduler.sinks.base.x_redact_url*"
  [placement]="orchestrator.provision.placement.*"
  [releases]="orchestrator.deploy.releases.x_remove_release* orchestrator.deploy.releases.x__drop_unused*
              orchestrator.deploy.releases.x_read_release* orchestrator.deploy.packing.xǁReleaseArchiveǁ*
              orchestrator.state.store.xǁStoreǁremove_release* orchestrator.state.store.xǁStoreǁ_live_nodes*
              orchestrator.state.store.xǁStoreǁrelease_sha_in_use*"
  [ssh]="orchestrator.remote.ssh.x__check_host_key* orchestrator.remote.ssh.x_fingerprint*
         orchestrator.remote.ssh.xǁHostKeyMismatchǁ* orchestrator.remote.ssh.xǁSSHSessionǁ__init__*"
  [auth]="orchestrator.server.middleware.* orchestrator.server.deps.* orchestrator.server.auth.*"
  [recovery]="orchestrator.provision.recovery.*"
)
all="engine sinks placement releases ssh auth recovery"

"$repo/.venv/bin/python" -c "import mutmut" 2>/dev/null || "$repo/.venv/bin/pip" install -q 'mutmut>=3.3,<4'
mutmut() { (cd "$dir" && nice -n 19 "$repo/.venv/bin/mutmut" "$@"); }

case "${1:-}" in
  results|show|recheck)  # these read the copy a run made: never remake it
    [[ -f "$dir/.orch-mutation-commit" ]] || { echo "no mutation run in $dir yet: scripts/mutation.sh [GROUP...]" >&2; exit 2; }
    commit=$(cat "$dir/.orch-mutation-commit") ;;
  *) commit=$(git rev-parse "${ORCH_MUTATION_REV:-HEAD}^{commit}") ;;
esac
if [[ ! -f "$dir/.orch-mutation-commit" || $(cat "$dir/.orch-mutation-commit") != "$commit" ]]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  git archive "$commit" | tar -x -C "$dir"
  only=""
  for group in $all; do
    for path in ${groups[$group]}; do only+="    $path"$'\n'; done
  done
  # (the copy's pyproject.toml has no [tool.mutmut], so mutmut reads setup.cfg)
  cat >"$dir/setup.cfg" <<EOF
[mutmut]
source_paths = orchestrator
only_mutate =
$only
pytest_add_cli_args_test_selection = tests/unit
pytest_add_cli_args =
    -p
    no:cacheprovider
    -q
also_copy =
    releases
    worker_native
    providers
    node_families
    examples
    bench
    scripts
    docs
    orch.yaml
    README.md
    .importlinter
    setup.py
    MANIFEST.in
use_git_change_detection = false
EOF
  # mutants/tests before mutmut starts: made by mutmut in its first run, it is not yet
  # importable when the stats run imports the tests' conftest ("No module named 'tests'")
  mkdir "$dir/mutants"
  cp -a "$dir/tests" "$dir/mutants/tests"
  echo "$commit" >"$dir/.orch-mutation-commit"
fi

case "${1:-}" in
  results) mutmut results; exit ;;
  show) mutmut show "$2"; exit ;;
  recheck)
    test_file=$2
    shift 2
    for target in "$dir/$test_file" "$dir/mutants/$test_file"; do cp "$test_file" "$target"; done
    for mutant in "$@"; do
      code=0
      (cd "$dir/mutants" && MUTANT_UNDER_TEST="$mutant" PYTHONPATH="$dir/mutants" nice -n 19 \
        "$repo/.venv/bin/python" -m pytest -x -q -p no:randomly -p no:cacheprovider "$test_file" >/dev/null 2>&1) || code=$?
      case $code in
        0) echo "$mutant survived" ;;
        1) echo "$mutant killed" ;;
        *) echo "$mutant error (pytest exit $code: the file does not run in the copy?)" ;;
      esac
    done
    exit ;;
esac
selected=${*:-$all}
patterns=()
for group in $selected; do
  [[ -n "${names[$group]:-}" ]] || { echo "unknown group $group (one of: $all)" >&2; exit 2; }
  read -ra more -d '' <<<"${names[$group]}" || true
  patterns+=("${more[@]}")
done
# Subprocesses of the tests (the CLI, several processes on one store) import the mutated copy too.
export PYTHONPATH="$dir/mutants"
mutmut run --max-children "$children" "${patterns[@]}"
mutmut results
