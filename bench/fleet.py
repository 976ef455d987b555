"""Side by side: how fast a local fleet comes up, and how fast a command runs across it.

    .venv/bin/python bench/fleet.py [--sizes 1,4,16,32,100] [--repeat 20] [--quick]

Everything happens in a temporary workspace (local provider, the sample ``primes``
release) that is removed at the end; every node is stopped and every ssh
ControlPersist master closed, on success, on an exception and on Ctrl-C.

Tables:

0. CLI start-up: ``python -c pass`` and ``orch --version``, and where the import time
   of ``orchestrator.cli.app`` goes (``python -X importtime``), per top-level package.
1. Time until N local nodes are ready: the engine's ``spawn`` in-process, and
   ``orch spawn`` as a subprocess (which adds Python start-up).  Targets, for the
   in-process spawn: 16 nodes <= 0.8 s, 32 <= 1.5 s, and the install step (unpacking
   the release's build and starting the agent) <= 0.15 s per node in the spawn of 16;
   100 nodes are printed too.  Nodes get binaries built once (no compiler runs on them).
2. ``true`` on every node of a 16-node fleet, median and p90 over ``--repeat`` runs:
   orch in-process (``exec_on``) with a warm ``SSHPool`` (a long-running orch) and a
   cold one per run, ``orch exec`` as a subprocess, fabric's ``ThreadingGroup`` (host
   keys from our pinned known_hosts, RejectPolicy; cold, warm, warm with TCP_NODELAY)
   and ``ansible all -m command -a true -f 16`` (cold and warm ControlPersist, with and
   without pipelining).  Target: orch in-process with a warm pool <= 150 ms and faster
   than both peers at their best.
3. A folder of ``--push-mib`` MiB (nested, an executable, a read-only file) pushed to
   ``--push-nodes`` nodes, median over ``--push-repeat`` runs, each from nothing on the
   nodes: ``transfer.push`` in-process with a warm ``SSHPool``, ``orch push`` as a
   subprocess, OpenSSH's ``scp -rp`` (one per node at once, pinned known_hosts, the fleet
   key) and ``ansible -m copy`` (``mode=preserve``, pipelining; ``--push-ansible-repeat``
   runs, a minute and more each); then pulled back into a folder per node by
   ``transfer.pull`` and by ``scp -rp``.  Every method's last copy is checked (untimed):
   each node's has the folder's modes and sha256s.  No target: the table only.

``--quick`` (what CI runs, tests/integration/test_benches.py): every table with fleets of
1 and 2 nodes and a run or two of each; the figures are not worth comparing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import paramiko
import yaml
from fabric import Config, Connection, ThreadingGroup
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers: the tests' workspace and Ansible set-up, shared

from orchestrator import fleet  # noqa: E402
from orchestrator.remote.fanout import exec_on  # noqa: E402
from orchestrator.remote.inventory import ansible_inventory, write_known_hosts  # noqa: E402
from orchestrator.remote.pool import SSHPool  # noqa: E402
from orchestrator.state import NodeRecord, NodeState, Store  # noqa: E402
from orchestrator.workspace import Workspace  # noqa: E402
from tests.helpers.ansible import ANSIBLE, ansible_env, close_control_masters  # noqa: E402
from tests.helpers.workspace import sample_workspace, stop_everything  # noqa: E402

BIN = Path(sys.executable).parent
ORCH = BIN / "orch"
FAMILY = "workers"
QUICK = {"sizes": "1,2", "repeat": 2, "spawn_repeat": 1, "ansible_repeat": 1, "exec_nodes": 2,
         "push_nodes": 2, "push_mib": 2.0, "push_repeat": 1, "push_ansible_repeat": 1}
"""``--quick``: every table, as small as it goes."""
SPAWN_TARGETS_S = {16: 0.8, 32: 1.5}
"""Nodes -> seconds until all are ready (in-process spawn)."""
INSTALL_TARGET_S = 0.15
INSTALL_TARGET_NODES = 16
"""Seconds per node in the install step, in the spawn of this many nodes."""
EXEC_TARGET_MS = 150.0

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # whole rows in a log
log = Console(stderr=True, highlight=False, style="dim")


# -- numbers ------------------------------------------------------------------------


@dataclass
class Samples:
    """Wall times of one measurement, in seconds."""

    label: str
    values: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p90(self) -> float:
        ordered = sorted(self.values)
        return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(label: str, runs: int, fn: Callable[[], object], *, note: str = "",
            before: Callable[[], object] | None = None, after: Callable[[], object] | None = None) -> Samples:
    """``runs`` timed calls of ``fn``; ``before``/``after`` run untimed around each."""
    samples = Samples(label, note=note)
    log.print(f"  {label}: {runs} run(s)")
    for _ in range(runs):
        if before is not None:
            before()
        samples.values.append(timed(fn))
        if after is not None:
            after()
    return samples


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def run_checked(argv: Sequence[str | Path], *, env: dict[str, str] | None = None) -> None:
    done = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout[-2000:]}"
                           f"\n{done.stderr[-2000:]}")


# -- the workspace and its cleanup ----------------------------------------------------


class BenchWorkspace:
    """A throwaway workspace with the local provider; cleans up everything it made."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
        self.ws: Workspace = sample_workspace(self.tmp / "ws")
        provider = self.ws.providers_dir / "local.yaml"  # room for the biggest fleet (loopback has 245)
        provider.write_text(provider.read_text().replace("max_nodes: 32", "max_nodes: 200"))
        self.store = Store.open(self.ws.state_db)
        self.control_dirs: list[Path] = []  # ansible's ssh ControlPath folders
        self.closers: list[Callable[[], None]] = []

    def ready_nodes(self) -> list[NodeRecord]:
        return self.store.list_nodes(family=FAMILY, states=[NodeState.READY])

    def spawn(self, count: int, events: fleet.FleetEvents | None = None) -> None:
        report = fleet.spawn(self.ws, self.store, FAMILY, count=count, events=events)
        if not report.ok:
            raise RuntimeError(f"spawn of {count} failed: {[str(f) for f in report.failures]}")

    def stop_all(self) -> None:
        live = fleet.select_nodes(self.store, all_nodes=True)
        if live:
            fleet.stop(self.ws, self.store, live)

    def close_control_masters(self) -> None:
        for folder in self.control_dirs:
            close_control_masters(folder)

    def cleanup(self) -> None:
        problems: list[str] = []
        steps: list[tuple[str, Callable[[], None]]] = [
            *(("close connections", c) for c in self.closers),
            ("close ansible's ssh masters", self.close_control_masters),
            ("stop nodes", self.stop_all),
            ("stop what the store missed", lambda: stop_everything(self.ws)),
            ("close the store", self.store.close),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning: a node left running is worse
                problems.append(f"{what}: {type(exc).__name__}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        for problem in problems:
            log.print(f"cleanup: {problem}", style="bold red")


@contextlib.contextmanager
def bench_workspace() -> Iterator[BenchWorkspace]:
    """The workspace; SIGTERM becomes KeyboardInterrupt, and a second Ctrl-C cannot
    interrupt the cleanup."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    bw = BenchWorkspace()
    try:
        yield bw
    finally:
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            log.print("cleaning up: stopping nodes, removing the workspace")
            bw.cleanup()
        finally:
            signal.signal(signal.SIGINT, sigint)
            signal.signal(signal.SIGTERM, previous)


# -- 0: start-up ----------------------------------------------------------------------


@dataclass
class ImportEntry:
    """One line of ``python -X importtime``: a module, its own and cumulative time (s)."""

    name: str
    own: float
    cumulative: float
    children: list[ImportEntry] = field(default_factory=list)

    @property
    def package(self) -> str:
        return self.name.split(".")[0]


@dataclass(frozen=True)
class PackageCost:
    package: str
    seconds: float  # its cumulative import time: with whatever it pulls in
    imported_by: list[str]
    heaviest_inside: list[tuple[str, float]]


def import_tree(module: str) -> ImportEntry:
    """The import tree of ``module`` in a fresh interpreter (``-X importtime``)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          capture_output=True, text=True, check=True)
    root = ImportEntry("<python -c>", 0.0, 0.0)
    pending: dict[int, list[ImportEntry]] = defaultdict(list)  # depth -> children waiting for their parent
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own_us, cumulative_us, raw = line[len("import time:"):].split("|")
        name = raw.rstrip()
        depth = (len(name) - len(name.lstrip())) // 2  # importtime indents two spaces per level
        entry = ImportEntry(name.strip(), int(own_us) / 1e6, int(cumulative_us) / 1e6, pending.pop(depth + 1, []))
        pending[depth].append(entry)  # lines come children first, then their parent
    root.children = pending.pop(0, [])
    root.cumulative = sum(c.cumulative for c in root.children)
    return root


def third_party_costs(root: ImportEntry, ours: str = "orchestrator") -> list[PackageCost]:
    """Each package that our modules (or the interpreter) import directly, with the
    cumulative time of those imports and the heaviest other packages inside them."""
    direct: dict[str, list[tuple[str, ImportEntry]]] = defaultdict(list)

    def walk(entry: ImportEntry) -> None:
        for child in entry.children:
            if child.package == ours:
                walk(child)
            else:
                direct[child.package].append((entry.name, child))

    walk(root)
    costs = []
    for package, found in direct.items():
        inside: dict[str, float] = defaultdict(float)
        stack = [entry for _, entry in found]
        while stack:
            entry = stack.pop()
            for child in entry.children:
                if child.package != package:
                    inside[child.package] += child.cumulative  # counted at its top, not again below
                else:
                    stack.append(child)
        heaviest = sorted(inside.items(), key=lambda kv: -kv[1])[:2]
        importers = sorted({by for by, _ in found})
        costs.append(PackageCost(package, sum(e.cumulative for _, e in found), importers, heaviest))
    return sorted(costs, key=lambda c: -c.seconds)


def own_time(root: ImportEntry, ours: str = "orchestrator") -> float:
    """Time spent in our own modules' bodies (pydantic model classes are built there)."""
    total, stack = 0.0, list(root.children)
    while stack:
        entry = stack.pop()
        if entry.package == ours:
            total += entry.own
            stack.extend(entry.children)
    return total


def startup(repeat: int) -> tuple[Samples, Samples]:
    log.print("CLI start-up")
    python = measure("python -c pass", repeat, lambda: run_checked([sys.executable, "-c", "pass"]))
    version = measure("orch --version", repeat, lambda: run_checked([ORCH, "--version"]))
    table = Table(title="0. CLI start-up (subprocess wall time)", title_justify="left", header_style="bold")
    for column in ("command", "median ms", "p90 ms", "runs"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for s in (python, version):
        table.add_row(s.label, ms(s.median), ms(s.p90), str(len(s.values)))
    console.print(table)

    module = "orchestrator.cli.app"
    tree = import_tree(module)
    console.print(f"   import {module} (what `orch --version` loads): {ms(tree.cumulative)} ms in one "
                  f"`python -X importtime` run; orch's own module bodies: {ms(own_time(tree))} ms")
    table = Table(title="   packages orch imports, with everything they pull in", title_justify="left",
                  header_style="bold")
    for column in ("package", "ms", "share", "imported by", "heaviest inside"):
        table.add_column(column, justify="right" if column in ("ms", "share") else "left")
    for cost in third_party_costs(tree)[:10]:
        table.add_row(cost.package, ms(cost.seconds), f"{cost.seconds / tree.cumulative:.0%}",
                      ", ".join(cost.imported_by[:3]) + (" ..." if len(cost.imported_by) > 3 else ""),
                      ", ".join(f"{name} {ms(sec)}" for name, sec in cost.heaviest_inside))
    console.print(table)
    return python, version


# -- 1: spawn -------------------------------------------------------------------------


class StageClock:
    """When each node entered each spawn stage (create, boot, connect, upload, build...)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.marks: list[tuple[str, str, float]] = []  # list.append is atomic: no lock needed

    def events(self) -> fleet.FleetEvents:
        return fleet.FleetEvents(stage=lambda node, stage: self.marks.append((node, stage, time.perf_counter())))

    def durations(self) -> dict[str, list[float]]:
        """Stage -> how long each node spent in it (until its next stage)."""
        spent: dict[str, list[float]] = defaultdict(list)
        per_node: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for node, stage, at in self.marks:
            per_node[node].append((at, stage))
        if self.marks:
            first = min(at for _, _, at in self.marks)
            spent["(before any node: config, release, settle)"].append(first - self.started)
        for marks in per_node.values():
            marks.sort()
            for (at, stage), (following, _) in itertools.pairwise(marks):
                spent[stage].append(following - at)
        ready = [at - self.started for _, stage, at in self.marks if stage == "ready"]
        if ready:
            spent["(first node ready, since spawn began)"].append(min(ready))
            spent["(last node ready, since spawn began)"].append(max(ready))
        return spent


def spawn_engine(bw: BenchWorkspace, count: int, clocks: list[StageClock]) -> None:
    clock = StageClock()
    clocks.append(clock)
    bw.spawn(count, events=clock.events())


def spawn_times(bw: BenchWorkspace, sizes: Sequence[int], repeat: int) -> None:
    log.print("spawn: warm-up (uploads the release once, untimed)")
    bw.spawn(1)
    bw.stop_all()
    table = Table(title="1. Time until N local nodes are ready (from none; median and max over "
                        f"{repeat} run(s), seconds)", title_justify="left", header_style="bold")
    for column in ("N", "engine spawn (in-process)", "max", "orch spawn (CLI subprocess)", "max",
                   "target (in-process)"):
        table.add_column(column, justify="right")
    staged: dict[int, list[StageClock]] = {}
    verdicts: list[str] = []
    for count in sizes:
        log.print(f"spawn {count}")
        clocks: list[StageClock] = []
        engine = measure(f"engine spawn {count}", repeat, functools.partial(spawn_engine, bw, count, clocks),
                         after=bw.stop_all)
        staged[count] = clocks
        cli = measure(f"orch spawn {count}", repeat,
                      functools.partial(run_checked, [ORCH, "-w", bw.ws.root, "spawn", FAMILY, "-n", str(count), "-q"]),
                      after=bw.stop_all)
        target = "-"
        if count in SPAWN_TARGETS_S:
            met = "met" if engine.median <= SPAWN_TARGETS_S[count] else "MISSED"
            target = f"<= {SPAWN_TARGETS_S[count]:g} s: {met}"
            verdicts.append(f"{count} local nodes ready in {engine.median:.2f} s (median) <= "
                            f"{SPAWN_TARGETS_S[count]:g} s: {met}")
        table.add_row(str(count), f"{engine.median:.2f}", f"{max(engine.values):.2f}", f"{cli.median:.2f}",
                      f"{max(cli.values):.2f}", target)
    console.print(table)
    if INSTALL_TARGET_NODES in staged:
        installs = [v for clock in staged[INSTALL_TARGET_NODES] for v in clock.durations().get("install", [])]
        if installs:
            median = statistics.median(installs)
            met = "met" if median <= INSTALL_TARGET_S else "MISSED"
            verdicts.append(f"install step in the spawn of {INSTALL_TARGET_NODES}: {median:.3f} s per node (median) "
                            f"<= {INSTALL_TARGET_S:g} s: {met}")
    for line in verdicts:
        console.print(line, markup=False)
    count = max(sizes)
    clocks = staged[count]
    spent: dict[str, list[float]] = defaultdict(list)
    for clock in clocks:
        for stage, values in clock.durations().items():
            spent[stage].extend(values)
    table = Table(title=f"   where the in-process spawn of {count} goes: seconds per node in each stage "
                        f"({len(clocks)} run(s) pooled)", title_justify="left", header_style="bold")
    for column in ("stage", "median", "max"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, values in spent.items():
        table.add_row(stage, f"{statistics.median(values):.3f}", f"{max(values):.3f}")
    console.print(table)


# -- 2: exec --------------------------------------------------------------------------


def fabric_group(nodes: Sequence[NodeRecord], ws: Workspace, known_hosts: Path, *, nodelay: bool) -> ThreadingGroup:
    """A ThreadingGroup on the nodes, host keys pinned: our known_hosts, unknown keys refused."""
    config = Config(overrides={"load_ssh_configs": False})
    connections = []
    for node in nodes:
        kwargs: dict[str, Any] = {"key_filename": str(ws.ssh_key), "allow_agent": False, "look_for_keys": False}
        if nodelay:  # what fabric does not do by itself: the DESIGN's TCP_NODELAY note
            sock = socket.create_connection((node.address or "", node.port or 22), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kwargs["sock"] = sock
        conn = Connection(node.address or "", user=node.ssh_user, port=node.port, config=config,
                          connect_kwargs=kwargs, connect_timeout=10)
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())  # fabric's default auto-adds
        conn.client.load_host_keys(str(known_hosts))
        connections.append(conn)
    return ThreadingGroup.from_connections(connections)


def fabric_run(group: ThreadingGroup) -> None:
    group.run("true", hide=True, in_stream=False)  # raises GroupException if any node fails


def bench_ansible_env(bw: BenchWorkspace, folder: Path, *, pipelining: bool) -> dict[str, str]:
    """ansible with folders of its own under ``folder`` (tests/helpers/ansible.py); its
    ssh masters are closed by the cleanup."""
    bw.control_dirs.append(folder / "cp")
    return ansible_env(folder, ANSIBLE_PIPELINING=str(pipelining))


def exec_times(bw: BenchWorkspace, nodes_wanted: int, repeat: int, ansible_repeat: int) -> list[Samples]:
    log.print(f"exec: spawning {nodes_wanted} nodes (untimed)")
    bw.spawn(nodes_wanted)
    nodes = bw.ready_nodes()
    ws = bw.ws
    known_hosts = write_known_hosts(ws, nodes)
    inventory = bw.tmp / "inventory.yml"
    inventory.write_text(yaml.safe_dump(ansible_inventory(ws, nodes, known_hosts=known_hosts), sort_keys=False))
    results: list[Samples] = []

    def orch_run(pool: SSHPool | None) -> None:
        outcome = exec_on(ws, nodes, "true", pool=pool)
        if outcome.failed or len(outcome.succeeded) != len(nodes):
            raise RuntimeError(f"orch exec failed on {sorted(outcome.failed)}")

    pool = SSHPool()
    bw.closers.append(pool.close_all)
    orch_run(pool)  # connect once: what a long-running orch has open
    results.append(measure("orch in-process, warm SSHPool", repeat, lambda: orch_run(pool),
                           note="exec_on with one pool reused across runs"))
    results.append(measure("orch in-process, cold", repeat, lambda: orch_run(None),
                           note=f"exec_on, a new pool ({len(nodes)} connects) per run"))
    results.append(measure("orch exec (CLI subprocess)", repeat,
                           lambda: run_checked([ORCH, "-w", ws.root, "exec", FAMILY, "--", "true"]),
                           note="Python start-up + imports + store + connect + exec"))

    def fabric_cold() -> None:
        group = fabric_group(nodes, ws, known_hosts, nodelay=False)
        try:
            fabric_run(group)
        finally:
            group.close()

    results.append(measure("fabric ThreadingGroup, cold", repeat, fabric_cold, note="a new group per run"))
    for nodelay in (False, True):
        group = fabric_group(nodes, ws, known_hosts, nodelay=nodelay)
        bw.closers.append(group.close)
        fabric_run(group)
        label = "fabric ThreadingGroup, warm" + (" + TCP_NODELAY socket" if nodelay else "")
        note = "group kept open" + (" (sock= we made)" if nodelay else " (fabric as it comes: Nagle on)")
        results.append(measure(label, repeat, functools.partial(fabric_run, group), note=note))

    if ANSIBLE.exists():
        argv: list[str | Path] = [ANSIBLE, "all", "-i", inventory, "-m", "command", "-a", "true", "-f", str(len(nodes))]
        # Two rows, not four: each ansible run takes seconds.  Cold as it comes; warm at its
        # best (ControlPersist masters open, pipelining: one ssh exchange per host).
        cold_env = bench_ansible_env(bw, bw.tmp / "ansible-cold", pipelining=False)
        results.append(measure(
            "ansible -m command, cold", ansible_repeat, functools.partial(run_checked, argv, env=cold_env),
            after=bw.close_control_masters, note="defaults; no ssh masters before the run"))
        warm_env = bench_ansible_env(bw, bw.tmp / "ansible-warm", pipelining=True)
        run_checked(argv, env=warm_env)  # opens the ControlPersist masters
        results.append(measure(
            "ansible -m command, warm + pipelining", ansible_repeat,
            functools.partial(run_checked, argv, env=warm_env),
            note="ControlPersist masters open, ANSIBLE_PIPELINING=True"))
        bw.close_control_masters()
    else:
        log.print(f"ansible is not installed at {ANSIBLE}: skipped (pip install -e .[dev])", style="yellow")
        results.append(Samples("ansible -m command", note=escape("not installed (pip install -e .[dev]): left out")))

    runs = f"{repeat} runs" + (f" ({ansible_repeat} for ansible)" if ansible_repeat != repeat else "")
    table = Table(title=f"2. `true` on {len(nodes)} nodes: wall time over {runs} (ms)",
                  title_justify="left", header_style="bold")
    for column in ("method", "median", "p90", "min", "how"):
        table.add_column(column, justify="left" if column in ("method", "how") else "right")
    for s in results:
        if not s.values:
            table.add_row(s.label, "-", "-", "-", s.note)
            continue
        table.add_row(s.label, ms(s.median), ms(s.p90), ms(min(s.values)), s.note)
    console.print(table)
    return results


# -- 3: push --------------------------------------------------------------------------


PUSH_DEST = "bench-push"
# What a copy holds, the same text wherever it is computed: each file's mode and sha256,
# each folder's mode, sorted.
TREE_LISTING = ("find . -mindepth 1 -printf '%P\\n' | LC_ALL=C sort | while read -r p; do "
                "if [ -d \"$p\" ]; then echo \"$(stat -c %a \"$p\") $p/\"; "
                "else echo \"$(stat -c %a \"$p\") $p $(sha256sum < \"$p\" | cut -d' ' -f1)\"; fi; done")


def push_payload(folder: Path, mib: float) -> Path:
    """A folder of ``mib`` MiB: four big files in nested folders, an executable, small
    files, an empty one and a read-only one."""
    payload = folder / "payload"
    (payload / "nested" / "deeper").mkdir(parents=True)
    total = int(mib * 2**20)
    for path, share in (("big.bin", 0.4), ("nested/middle.bin", 0.3), ("nested/deeper/small.bin", 0.2),
                        ("tail.bin", 0.1)):
        (payload / path).write_bytes(os.urandom(int(total * share)))
    for i in range(8):
        (payload / "nested" / f"note-{i}.txt").write_text(f"note {i}\n" * 50)
    (payload / "empty").write_bytes(b"")
    tool = payload / "nested" / "tool.sh"
    tool.write_text("#!/bin/sh\necho ok\n")
    tool.chmod(0o755)
    (payload / "readonly.cfg").write_text("x = 1\n")
    (payload / "readonly.cfg").chmod(0o444)
    return payload


def local_listing(folder: Path) -> str:
    return subprocess.run(["sh", "-c", TREE_LISTING], cwd=folder, capture_output=True, text=True,
                          check=True).stdout


def parallel_commands(argvs: Sequence[Sequence[str | Path]], *, env: dict[str, str] | None = None) -> None:
    """Run every command at once (one per node) and wait for all; any failure raises."""
    procs = [subprocess.Popen([str(a) for a in argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for argv in argvs]
    failures = []
    for argv, proc in zip(argvs, procs, strict=True):
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{' '.join(map(str, argv))} exited {proc.returncode}: {out[-1000:]}")
    if failures:
        raise RuntimeError("\n".join(failures))


def scp_argv(ws: Workspace, known_hosts: Path, node: NodeRecord, source: str, destination: str) -> list[str]:
    """OpenSSH's scp with the pinned known_hosts and the fleet key alone (no ssh_config)."""
    return ["scp", "-r", "-p", "-q", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-i", str(ws.ssh_key), "-P", str(node.port or 22), source, destination]


def push_times(bw: BenchWorkspace, nodes_wanted: int, mib: float, repeat: int, ansible_repeat: int) -> list[Samples]:
    """Table 3: a folder of ``mib`` MiB to every node (and back), orch against scp and ansible."""
    from orchestrator.remote import transfer

    log.print(f"push: {nodes_wanted} nodes (untimed spawn), a {mib:g} MiB folder")
    bw.spawn(nodes_wanted)
    nodes = bw.ready_nodes()
    ws = bw.ws
    payload = push_payload(bw.tmp / "push", mib)
    size = sum(p.stat().st_size for p in payload.rglob("*") if p.is_file())
    files = sum(1 for p in payload.rglob("*") if p.is_file())
    expected = local_listing(payload)
    pool = SSHPool()
    bw.closers.append(pool.close_all)
    homes = {n: r.stdout.strip() for n, r in exec_on(ws, nodes, "echo $HOME", pool=pool).succeeded.items()}
    if len(homes) != len(nodes):
        raise RuntimeError("cannot read every node's home")
    known_hosts = write_known_hosts(ws, nodes)
    results: list[Samples] = []

    def clear_nodes() -> None:
        outcome = exec_on(ws, nodes, f"rm -rf {PUSH_DEST}", pool=pool)
        if outcome.failed:
            raise RuntimeError(f"cannot clear {PUSH_DEST} on {sorted(outcome.failed)}")

    def check_nodes(label: str) -> None:  # untimed: every node has exactly the folder
        outcome = exec_on(ws, nodes, f"cd {PUSH_DEST} && {TREE_LISTING}", pool=pool)
        wrong = sorted(n for n in (n.id for n in nodes)
                       if n not in outcome.succeeded or outcome.succeeded[n].stdout != expected)
        if wrong:
            raise RuntimeError(f"{label}: the copy on {wrong} differs from the folder")

    def timed_push(label: str, runs: int, fn: Callable[[], object], note: str) -> None:
        results.append(measure(label, runs, fn, before=clear_nodes, note=note))
        check_nodes(label)  # untimed, after the last run: every row must really copy

    def orch_push() -> None:
        report = transfer.push(ws, nodes, payload, PUSH_DEST, pool=pool)
        if report.failed:
            raise RuntimeError(f"orch push failed on {sorted(report.failed)}")

    timed_push("orch push in-process, warm SSHPool", repeat, orch_push,
               note="transfer.push: SFTP, 255 KiB pipelined writes, a thread per node")
    timed_push("orch push (CLI subprocess)", repeat,
               lambda: run_checked([ORCH, "-w", ws.root, "push", FAMILY, payload, PUSH_DEST, "-q"]),
               note="start-up + store + connect + push")
    scp = shutil.which("scp")
    if scp:
        timed_push("scp -rp, one per node at once", repeat,
                   lambda: parallel_commands([scp_argv(ws, known_hosts, n, str(payload),
                                                       f"{n.ssh_user}@{n.address}:{homes[n.id]}/{PUSH_DEST}")
                                              for n in nodes]),
                   note="OpenSSH scp (SFTP protocol), pinned known_hosts, the fleet key")
    else:
        results.append(Samples("scp -rp", note="not installed: left out"))
    if ANSIBLE.exists():
        inventory_data = ansible_inventory(ws, nodes, known_hosts=known_hosts)
        for group in inventory_data["all"]["children"].values():
            for node_id, host in group["hosts"].items():
                host["orch_home"] = homes[node_id]
        inventory = bw.tmp / "push-inventory.yml"
        inventory.write_text(yaml.safe_dump(inventory_data, sort_keys=False))
        env = bench_ansible_env(bw, bw.tmp / "ansible-push", pipelining=True)
        argv: list[str | Path] = [ANSIBLE, "all", "-i", inventory, "-m", "copy", "-f", str(len(nodes)), "-a",
                                  f"src={payload}/ dest={{{{ orch_home }}}}/{PUSH_DEST}/ mode=preserve"]
        timed_push("ansible -m copy, pipelining", ansible_repeat, functools.partial(run_checked, argv, env=env),
                   note=f"mode=preserve, -f {len(nodes)}; {ansible_repeat} run(s): its first opens the ssh masters")
        bw.close_control_masters()
    else:
        results.append(Samples("ansible -m copy", note=escape("not installed (pip install -e .[dev]): left out")))

    # and back: every node's folder into a local folder of its own
    pulled = bw.tmp / "pulled"

    def clear_local() -> None:
        shutil.rmtree(pulled, ignore_errors=True)
        pulled.mkdir()

    def check_local(label: str) -> None:
        wrong = sorted(n.id for n in nodes if local_listing(pulled / n.id / PUSH_DEST) != expected)
        if wrong:
            raise RuntimeError(f"{label}: the copies pulled from {wrong} differ from the folder")

    def timed_pull(label: str, runs: int, fn: Callable[[], object], note: str) -> None:
        results.append(measure(label, runs, fn, before=clear_local, note=note))
        check_local(label)

    def orch_pull() -> None:
        report = transfer.pull(ws, nodes, PUSH_DEST, pulled, pool=pool)
        if report.failed:
            raise RuntimeError(f"orch pull failed on {sorted(report.failed)}")

    def scp_pull() -> None:
        for n in nodes:
            (pulled / n.id).mkdir(exist_ok=True)
        parallel_commands([scp_argv(ws, known_hosts, n, f"{n.ssh_user}@{n.address}:{homes[n.id]}/{PUSH_DEST}",
                                    str(pulled / n.id)) for n in nodes])

    timed_pull("orch pull in-process, warm SSHPool", repeat, orch_pull,
               note="transfer.pull: SFTP, 255 KiB prefetched reads, into DIR/NODE/")
    if scp:
        timed_pull("scp -rp back, one per node at once", repeat, scp_pull, note="into DIR/NODE/")
    clear_nodes()
    shutil.rmtree(pulled, ignore_errors=True)

    table = Table(title=f"3. push a {size / 2**20:,.1f} MiB folder ({files} files) to {len(nodes)} nodes, and pull "
                        f"it back: wall time over {repeat} run(s) "
                        f"({ansible_repeat} for ansible) (s)", title_justify="left", header_style="bold")
    for column in ("method", "median s", "min s", "MiB/s across nodes", "how"):
        table.add_column(column, justify="left" if column in ("method", "how") else "right")
    for s in results:
        if not s.values:
            table.add_row(s.label, "-", "-", "-", s.note)
            continue
        rate = size * len(nodes) / 2**20 / s.median
        table.add_row(s.label, f"{s.median:.2f}", f"{min(s.values):.2f}", f"{rate:,.1f}", s.note)
    console.print(table)
    return results


def verdict(results: Sequence[Samples], startup_s: float, nodes: int) -> None:
    by = {s.label: s for s in results}
    orch = by["orch in-process, warm SSHPool"]
    fabric = [s for s in results if s.label.startswith("fabric")]
    ansible = [s for s in results if s.label.startswith("ansible") and s.values]
    best = [min(peer, key=lambda s: s.median) for peer in (fabric, ansible) if peer]
    fast_enough = orch.median * 1000 <= EXEC_TARGET_MS
    faster = all(orch.median < b.median for b in best)
    console.print(f"[bold]Target[/bold] (`true` on {nodes} nodes) applies to "
                  f"[bold]{orch.label}[/bold] (how a long-running orch runs commands), against each peer's "
                  "fastest row:")
    console.print(f"  median {ms(orch.median)} ms <= {EXEC_TARGET_MS:g} ms: "
                  f"{'met' if fast_enough else 'MISSED'}")
    console.print("  faster than " + ", ".join(f"{b.label} ({ms(b.median)} ms)" for b in best) + ": "
                  + ("met" if faster else "MISSED"))
    cold = by["orch in-process, cold"]
    cold_peers = [s for s in results if s.label in ("fabric ThreadingGroup, cold", "ansible -m command, cold")]
    console.print(f"Also: cold, {ms(cold.median)} ms in-process vs "
                  + ", ".join(f"{s.label} {ms(s.median)} ms" for s in cold_peers)
                  + f"; the CLI's {ms(by['orch exec (CLI subprocess)'].median)} ms includes "
                  f"{ms(startup_s)} ms of start-up (orch --version).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1,4,16,32,100",
                        help="fleet sizes to spawn, comma-separated (default 1,4,16,32,100)")
    parser.add_argument("--repeat", type=int, default=20, help="runs per exec measurement (default 20)")
    parser.add_argument("--spawn-repeat", type=int, default=3, help="spawns per size and method (default 3)")
    parser.add_argument("--ansible-repeat", type=int, default=None,
                        help="runs per ansible measurement, seconds each (default: --repeat)")
    parser.add_argument("--exec-nodes", type=int, default=16, help="fleet size for the exec table (default 16)")
    parser.add_argument("--push-nodes", type=int, default=8, help="fleet size for the push table (default 8)")
    parser.add_argument("--push-mib", type=float, default=100.0, help="MiB in the pushed folder (default 100)")
    parser.add_argument("--push-repeat", type=int, default=3, help="runs per push and pull method (default 3)")
    parser.add_argument("--push-ansible-repeat", type=int, default=1,
                        help="runs of ansible -m copy, a minute and more each (default 1)")
    parser.add_argument("--quick", action="store_true", help="every table, as small as it goes (CI): "
                        + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.repeat < 1 or args.spawn_repeat < 1:
        parser.error("sizes and repeats must be >= 1")

    console.print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
                  f"Python {platform.python_version()}, paramiko {version_of('paramiko')}, "
                  f"fabric {version_of('fabric')}, ansible-core {version_of('ansible-core')}")
    _, version = startup(args.repeat)
    with bench_workspace() as bw:
        spawn_times(bw, sizes, args.spawn_repeat)
        results = exec_times(bw, args.exec_nodes, args.repeat, args.ansible_repeat or args.repeat)
        push_times(bw, args.push_nodes, args.push_mib, args.push_repeat, args.push_ansible_repeat)
    verdict(results, version.median, args.exec_nodes)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log.print("interrupted; cleaned up", style="bold")
        sys.exit(130)
