"""A command on every node: through the agents `orch serve` holds, over SSH, and by Ansible.

    .venv/bin/python bench/exec.py [--nodes 32] [--runs 20] [--ansible-runs 3] [--cli-runs 5] [--quick]

In one run on the same ``--nodes`` real local nodes (sshd on loopback addresses, agents
over mutual TLS), the wall time of running ``true`` on every node:

1. ``POST /nodes/exec {"family": "workers", "command": "true"}`` against a real
   ``orch serve`` subprocess (one keep-alive httpx client), once every node's agent is
   connected to the server (a small job brings them in; they stay after it).  Every
   answer must be ``{"exit": 0, ...}``.  Then as many runs of a command that prints its
   parent's command line, counting the nodes where that is ``orch_agent`` (the server
   falls back to SSH for a node whose agent is not connected at that moment: there the
   parent is sshd's shell), back to back and after pauses of ``--idle`` to ``--idle`` +
   3 seconds without a request; the verdicts want every one.
2. ``orchestrator.remote.fanout.exec_on(ws, nodes, "true")``: a fresh SSHPool each call (what
   ``orch exec`` does without a server), and one SSHPool reused across calls (warm).
3. ``ansible all -i INVENTORY -m command -a true --forks N`` on ``orch inventory``'s
   output, with an isolated config, home and ControlPath folder (host keys checked
   against the pinned known_hosts): cold (a fresh ControlPath folder each run, its
   masters closed after it) and warm (ControlPersist masters kept from a first run).
4. ``orch exec --json workers -- true`` as a CLI subprocess while the server runs (it
   goes through the server): the CLI's start-up on top of (1); and ``orch --version``,
   the start-up alone.

Target (issue #6): <= 50 ms through agents (median).

``--quick`` (what CI runs, tests/integration/test_benches.py): every path on 2 nodes,
a few runs each, a short pause; the figures are not worth comparing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers: the tests' workspaces, server and Ansible, shared

from orchestrator import fleet  # noqa: E402
from orchestrator.remote import fanout as remote  # noqa: E402
from orchestrator.remote.pool import SSHPool  # noqa: E402
from orchestrator.remote.ssh import Result  # noqa: E402
from orchestrator.state import NodeRecord, NodeState, Store  # noqa: E402
from orchestrator.workspace import Workspace  # noqa: E402
from tests.helpers.ansible import ANSIBLE, ansible_env, close_control_masters  # noqa: E402
from tests.helpers.cli import ORCH  # noqa: E402
from tests.helpers.serving import Server, start_server, stop_server, wait_until  # noqa: E402
from tests.helpers.workspace import primes_workspace, stop_everything  # noqa: E402

FAMILY = "workers"
QUICK = {"nodes": 2, "runs": 3, "ansible_runs": 1, "cli_runs": 1, "idle_runs": 1, "idle": 0.5}
"""``--quick``: every path, as small as it goes."""
TARGET_MS = 50.0
PARENT = "tr '\\0' ' ' < /proc/$PPID/cmdline"  # the command's parent: the agent, or sshd's shell

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # whole rows in a log


@dataclass
class Row:
    what: str
    seconds: list[float]
    note: str = ""
    under_agent: tuple[int, int] | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000 if self.seconds else float("nan")

    @property
    def p90_ms(self) -> float:
        if len(self.seconds) < 2:
            return self.seconds[0] * 1000 if self.seconds else float("nan")
        return statistics.quantiles(self.seconds, n=10, method="inclusive")[8] * 1000


def timed(runs: int, call: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


# -- the server (tests/helpers/serving.py) -----------------------------------------------


def call(server: Server, method: str, path: str, body: Any = None) -> Any:
    """One request on the server's keep-alive client; its JSON answer (an error status ends the bench)."""
    response = server.client.request(method, path, json=body)
    if response.status_code >= 400:
        raise SystemExit(f"{method} {path} answered {response.status_code}: {response.text}")
    return response.json()


def check_answers(answers: dict[str, Any], nodes: list[NodeRecord], what: str) -> None:
    wrong = {name: a for name, a in answers.items() if a.get("exit") != 0}
    if set(answers) != {n.id for n in nodes} or wrong:
        raise SystemExit(f"{what}: {len(answers)} answers for {len(nodes)} nodes, not exit 0: {wrong}")


def through_agents(args: argparse.Namespace, server: Server, nodes: list[NodeRecord]) -> tuple[Row, Row, Row, Row, Row]:
    # A small job brings every node's agent in; they stay connected to the server after it.
    started = time.perf_counter()
    job = call(server, "POST", "/jobs", {"work": "primes:count_primes", "input": "0:1000"})["job"]

    def finished() -> bool:
        state = call(server, "GET", f"/jobs/{job}")
        if state["state"] in ("failed", "suspended"):
            raise SystemExit(f"the warm-up job {job} ended {state['state']}: {state['reason']}")
        return state["state"] == "done"

    wait_until(finished, 300, f"the warm-up job {job} done")
    ids = {n.id for n in nodes}
    wait_until(lambda: ids <= set(call(server, "GET", "/agents")), 180, f"all {len(ids)} agents connected")
    console.print(f"warm-up job done and all {len(ids)} agents connected in {time.perf_counter() - started:.2f} s",
                  markup=False)

    def exec_once() -> None:
        check_answers(call(server, "POST", "/nodes/exec", {"family": FAMILY, "command": "true"}), nodes,
                      "POST /nodes/exec")

    exec_once()  # warm: the route, the client's connection
    api = Row(f"POST /nodes/exec, through {len(nodes)} agents", timed(args.runs, exec_once),
              "one keep-alive httpx client; every answer exit 0")

    # Did the command really run under the agents?  Through SSH its parent is sshd's shell
    # (the server falls back to SSH for a node whose agent is not connected at that moment).
    under_agent: list[int] = []
    errors: list[str] = []

    def parent_once(strict: bool = True) -> None:
        answers = call(server, "POST", "/nodes/exec", {"family": FAMILY, "command": PARENT})
        if strict:
            check_answers(answers, nodes, "the parent check")
        errors.extend(f"{name}: {a.get('error') or a}" for name, a in answers.items() if a.get("exit") != 0)
        under_agent.append(sum("orch_agent" in a.get("stdout", "") for a in answers.values()))

    def counted(row: Row) -> Row:
        row.under_agent = (sum(under_agent), len(nodes) * len(under_agent))
        row.note = f"parent orch_agent on {row.under_agent[0]} of {row.under_agent[1]} node-runs"
        if row.under_agent[0] != row.under_agent[1]:
            row.note += f" (min {min(under_agent)} a run); the rest over SSH"
        if errors:
            row.note += f"; {len(errors)} errors, e.g. {errors[0]}"
        under_agent.clear()
        errors.clear()
        return row

    parents = counted(Row(f"POST /nodes/exec, `{PARENT}`", timed(args.runs, parent_once)))

    # The same after the server has sent the agents nothing for a while (as between two
    # `orch exec` of a person): run i follows --idle + 3 i / --idle-runs seconds without a
    # request (the idle times sweep 3 s, three of the agents' 1 s heartbeats).
    idle_times: list[float] = []
    pauses = [args.idle + 3.0 * i / args.idle_runs for i in range(args.idle_runs)]
    for pause in pauses:
        time.sleep(pause)
        started = time.perf_counter()
        parent_once(strict=False)
        idle_times.append(time.perf_counter() - started)
    idle = counted(Row(f"POST /nodes/exec, the same after {pauses[0]:.1f}-{pauses[-1]:.1f} s idle", idle_times))

    def cli_once() -> None:
        ran = subprocess.run([*ORCH, "exec", "--json", FAMILY, "--", "true"], cwd=server.ws.root,
                             capture_output=True, text=True, timeout=120, check=False)
        if ran.returncode != 0:
            raise SystemExit(f"orch exec exited {ran.returncode}: {ran.stderr}")
        check_answers(json.loads(ran.stdout), nodes, "orch exec --json")

    def version_once() -> None:
        subprocess.run([*ORCH, "--version"], cwd=server.ws.root, capture_output=True, timeout=120, check=True)

    cli = Row("orch exec --json workers -- true (CLI, via the server)", timed(args.cli_runs, cli_once),
              "a new Python process each run")
    bare = Row("orch --version (the CLI's start-up alone)", timed(args.cli_runs, version_once),
               "python -m orchestrator, no request")
    return api, parents, idle, cli, bare


# -- SSH ---------------------------------------------------------------------------------


def over_ssh(args: argparse.Namespace, ws: Workspace, nodes: list[NodeRecord]) -> tuple[Row, Row]:
    def check(outcome: remote.ExecOutcome, what: str) -> None:
        wrong = {k: str(v) for k, v in outcome.nodes.items() if not (isinstance(v, Result) and v.exited == 0)}
        if len(outcome.nodes) != len(nodes) or wrong:
            raise SystemExit(f"{what}: {wrong}")

    fresh = Row(f"remote.exec_on, fresh SSHPool each call ({len(nodes)} nodes)",
                timed(args.runs, lambda: check(remote.exec_on(ws, nodes, "true"), "exec_on (fresh pool)")),
                "what `orch exec` does without a server")
    with SSHPool() as pool:
        check(remote.exec_on(ws, nodes, "true", pool=pool), "exec_on (warm-up)")
        warm = Row(f"remote.exec_on, one SSHPool reused ({len(nodes)} nodes)",
                   timed(args.runs, lambda: check(remote.exec_on(ws, nodes, "true", pool=pool), "exec_on (warm)")),
                   "sessions open from a first call")
    return fresh, warm


# -- Ansible -----------------------------------------------------------------------------


class Ansible:
    """The real ``ansible`` with a config, home, temp and ControlPath folders of its own,
    host keys checked against the inventory's pinned known_hosts (tests/helpers/ansible.py,
    as tests/integration/test_ansible.py runs it)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = ansible_env(home)
        self.control_dirs: list[Path] = []

    def control_dir(self) -> Path:
        path = self.home / f"cp{len(self.control_dirs)}"
        path.mkdir()
        self.control_dirs.append(path)
        return path

    def run(self, inventory: Path, forks: int, control_dir: Path, hosts: set[str]) -> None:
        env = {**self.env, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir)}
        done = subprocess.run([str(ANSIBLE), "all", "-i", str(inventory), "-m", "command", "-a", "true",
                               "--forks", str(forks)], env=env, capture_output=True, text=True, timeout=600,
                              check=False)
        ok = set(re.findall(r"^(\S+) \| CHANGED \| rc=0", done.stdout, flags=re.MULTILINE))
        if done.returncode != 0 or ok != hosts:
            raise SystemExit(f"ansible exited {done.returncode}, {len(ok)} of {len(hosts)} hosts rc=0:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def close(self, control_dir: Path) -> None:
        """Close the ControlPersist masters left in ``control_dir``."""
        close_control_masters(control_dir)

    def close_all(self) -> None:
        for path in self.control_dirs:
            self.close(path)


def by_ansible(args: argparse.Namespace, ws: Workspace, folder: Path, nodes: list[NodeRecord]) -> list[Row]:
    if not ANSIBLE.exists() or shutil.which("ssh") is None:
        console.print(f"ansible: {ANSIBLE} or ssh missing (pip install -e .[dev]); left out", markup=False)
        return [Row("ansible all -m command -a true", [], escape("not installed (pip install -e .[dev]) or no ssh"))]
    inventory = folder / "inventory.yml"
    written = subprocess.run([*ORCH, "inventory", "--family", FAMILY, "--output", str(inventory)], cwd=ws.root,
                             capture_output=True, text=True, timeout=60, check=False)
    if written.returncode != 0:
        raise SystemExit(f"orch inventory exited {written.returncode}: {written.stderr}")
    ansible = Ansible(folder / "ansible")
    hosts = {n.id for n in nodes}
    forks = len(nodes)
    try:
        cold = []
        for _ in range(args.ansible_runs):
            control_dir = ansible.control_dir()
            started = time.perf_counter()
            ansible.run(inventory, forks, control_dir, hosts)
            cold.append(time.perf_counter() - started)
            ansible.close(control_dir)
        control_dir = ansible.control_dir()
        ansible.run(inventory, forks, control_dir, hosts)  # opens the ControlPersist masters
        warm = timed(args.ansible_runs, lambda: ansible.run(inventory, forks, control_dir, hosts))
    finally:
        ansible.close_all()
    return [Row(f"ansible all -m command -a true --forks {forks}, cold", cold,
                "new ssh connections each run (masters closed after it)"),
            Row(f"ansible all -m command -a true --forks {forks}, ControlPersist warm", warm,
                "ssh masters kept open from a first run")]


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--runs", type=int, default=20, help="timed runs of the API and SSH paths")
    parser.add_argument("--ansible-runs", type=int, default=3, help="timed runs of each Ansible variant")
    parser.add_argument("--cli-runs", type=int, default=5, help="timed runs of `orch exec` as a subprocess")
    parser.add_argument("--idle-runs", type=int, default=8, help="timed runs of exec after a pause")
    parser.add_argument("--idle", type=float, default=4.0, help="the shortest pause before an idle run (s)")
    parser.add_argument("--quick", action="store_true",
                        help="every path, as small as it goes (CI): " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="orch-bench-exec-"))
    # The nodes build the release from its source: nothing to build here.
    ws = primes_workspace(folder / "ws", count=args.nodes, max_nodes=args.nodes, workers_per_node=None)
    store = Store.open(ws.state_db)
    server: Server | None = None
    rows: list[Row] = []
    try:
        started = time.perf_counter()
        report = fleet.spawn(ws, store, FAMILY)
        if len(report.ready) != args.nodes:
            raise SystemExit(f"only {len(report.ready)} of {args.nodes} nodes came up: "
                             f"{[str(f) for f in report.failures]}")
        console.print(f"{args.nodes} local nodes ready in {time.perf_counter() - started:.2f} s", markup=False)
        nodes = fleet.select_nodes(store, family=FAMILY, states=[NodeState.READY])

        server = Server(ws, *start_server(ws, "--port", "0"))
        console.print(f"orch serve at {server.url} (pid {server.proc.pid})", markup=False)
        api, parents, idle, cli, bare = through_agents(args, server, nodes)
        rows += [api, parents, idle]
        rows += over_ssh(args, ws, nodes)
        rows += by_ansible(args, ws, folder, nodes)
        rows += [cli, bare]
    finally:
        if server is not None:
            server.client.close()
            code = stop_server(server.proc)
            if code != 0:
                console.print(f"orch serve exited {code} on SIGTERM:\n{server.log.read_text()[-3000:]}",
                              markup=False)
        store.close()
        stop_everything(ws)
        shutil.rmtree(folder, ignore_errors=True)

    table = Table(title=f"`true` on {args.nodes} local nodes, wall time per fan-out", title_justify="left")
    for column in ("path", "runs", "median ms", "p90 ms", "x agents", "note"):
        table.add_column(column, justify="left" if column in ("path", "note") else "right")
    base = rows[0].median_ms
    for row in rows:
        if not row.seconds:
            table.add_row(row.what, "0", "-", "-", "-", row.note)
            continue
        table.add_row(row.what, str(len(row.seconds)), f"{row.median_ms:.1f}", f"{row.p90_ms:.1f}",
                      f"{row.median_ms / base:.1f}", row.note)
    console.print(table)
    console.print(f"{'met' if base <= TARGET_MS else 'NOT met'}: <= {TARGET_MS:.0f} ms through agents "
                  f"(median {base:.1f} ms, p90 {rows[0].p90_ms:.1f} ms, {args.nodes} nodes)", markup=False)
    for row, when in ((rows[1], "back to back"), (rows[2], "after a pause")):
        ran, asked = row.under_agent or (0, 1)
        console.print(f"{'met' if ran == asked else 'NOT met'}: every command ran under its node's agent, {when} "
                      f"({ran} of {asked} node-runs; the rest fell back to SSH)", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
