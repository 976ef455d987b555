"""Putting the node agent on nodes: its code, the port runner, certificates, config, and
a running supervisor.

On the node, beside the release (see ``bootstrap.py``)::

    ~/orch/agent/            (0700)
        orch_agent/*.py      a copy of orchestrator/agent/*.py (standard library only)
        orch-port            the port runner, built for the node's platform (native.py):
                             the node needs no compiler
        agent.json           node id, scheduler address, slots, paths (relative to here)
        ca.crt, node.crt, node.key (0600)   the workspace CA, this node's cert and key
        bundle.stamp         what was installed (see ``AgentPayload.stamp``)
        agent.pid, agent.code, agent.log    the supervisor's pid, code digest, the log

Everything travels as one tarball (one SFTP upload), only when the node's stamp differs,
and is installed by a few lines of the bootstrap script, so the agent adds no SSH round
trip to a bootstrap.  ``python3 -m orch_agent ensure`` starts the supervisor unless one
already runs this code and config; the script runs it in the background while the
release is unpacked.

The scheduler dials nothing: agents dial it, at :func:`scheduler_endpoint`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shlex
import tarfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import load_family, load_settings
from orchestrator.deploy import native, pki
from orchestrator.errors import ConfigError, OrchError, RemoteError, StateError
from orchestrator.remote.fanout import ssh_target
from orchestrator.remote.pool import SSHPool
from orchestrator.remote.ssh import Result, SSHSession, SSHTarget
from orchestrator.state import NodeRecord, Store
from orchestrator.workspace import Workspace

AGENT_SOURCE = Path(__file__).resolve().parents[1] / "agent"

REMOTE_AGENT = "orch/agent"
REMOTE_BUNDLE = f"{REMOTE_AGENT}/.bundle.tar.gz"
STAMP_MARK = "::orch-agent-stamp "
PORT_RANGE = (20000, 29999)
HEARTBEAT = 5.0
NEED_BUNDLE = 10  # exit status of the ensure script when the node's agent files are stale

# -S: the agent imports only the standard library, so the site module (a few ms of
# every start-up, on every node) is of no use to it.
_PYTHON = f'PYTHONPATH="$HOME/{REMOTE_AGENT}" python3 -S -m orch_agent'
_CONFIG = f'--config "$HOME/{REMOTE_AGENT}/agent.json"'


# -- where agents dial ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    workspace_id: str


_FACTS_TTL = 5.0  # seconds: a spawn's bootstraps open the store once between them
_facts_cache: dict[tuple[Path, int], tuple[float, _Facts]] = {}
_facts_lock = threading.Lock()


def _facts(ws: Workspace, store: Store | None = None) -> _Facts:
    if store is not None:
        return _Facts(store.workspace_id)
    try:  # keyed by the store file too: a workspace made again in the same place is another
        key = (ws.root, os.stat(ws.state_db).st_ino)
    except OSError as exc:
        raise StateError(f"the workspace has no state store ({ws.state_db}): {exc.strerror}") from exc
    with _facts_lock:
        cached = _facts_cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < _FACTS_TTL:
            return cached[1]
        try:
            with Store.open(ws.state_db, migrate=False) as opened:
                facts = _Facts(opened.workspace_id)
        except (StateError, IndexError) as exc:
            raise StateError(f"cannot read the workspace id from {ws.state_db}: {exc}") from exc
        _facts_cache[key] = (time.monotonic(), facts)
        return facts


def default_scheduler_port(workspace_id: str) -> int:
    """A port in 20000..29999 that depends only on the workspace id."""
    low, high = PORT_RANGE
    return low + int(hashlib.sha256(workspace_id.encode()).hexdigest(), 16) % (high - low + 1)


def scheduler_port(ws: Workspace, *, store: Store | None = None) -> int:
    """The scheduler's TLS port: ``scheduler_port`` in orch.yaml, else from the workspace id."""
    settings = load_settings(ws)
    return settings.scheduler_port or default_scheduler_port(_facts(ws, store).workspace_id)


def scheduler_endpoint(ws: Workspace, node: NodeRecord, *, store: Store | None = None) -> tuple[str, int]:
    """(host, port) the node's agent dials: the address of this machine that the node's
    driver recorded as its ``gateway`` (local nodes: 127.0.0.1; netns nodes: their
    bridge), else ``scheduler_address`` from orch.yaml (else ConfigError)."""
    return _endpoint(ws, node, _facts(ws, store))


def _endpoint(ws: Workspace, node: NodeRecord, facts: _Facts) -> tuple[str, int]:
    settings = load_settings(ws)
    port = settings.scheduler_port or default_scheduler_port(facts.workspace_id)
    gateway = node.extra.get("gateway")
    if gateway:
        return str(gateway), port
    if settings.scheduler_address:
        return settings.scheduler_address, port
    raise ConfigError(
        f"node {node.id} (provider {node.provider}) needs an address of this machine that it can reach",
        hint=f"set scheduler_address (and scheduler_port, now {port}) in {ws.relative(ws.settings_file)}",
    )


# -- what goes to a node ----------------------------------------------------------------------


def _agent_files() -> list[tuple[str, bytes]]:
    return [(f"orch_agent/{p.name}", p.read_bytes()) for p in sorted(AGENT_SOURCE.glob("*.py"))]


@dataclass(frozen=True)
class AgentPayload:
    """Everything a node's agent install needs but its certificate.

    ``stamp`` digests the agent code, the port runner, agent.json and the CA: the node
    has this agent when its ``bundle.stamp`` says so (the node's certificate is issued
    only when a bundle goes)."""

    node: str
    config: bytes
    ca: bytes
    files: tuple[tuple[str, bytes], ...]
    stamp: str

    def bundle(self, cert: bytes, key: bytes) -> bytes:
        """The tarball that goes to ``~/orch/agent/`` (the key 0600).  Built for every
        node, so kept cheap: plain ustar, gzip level 1 (~3 ms)."""
        out = io.BytesIO()
        entries = [*self.files, ("agent.json", self.config), ("ca.crt", self.ca), ("node.crt", cert)]
        now = int(time.time())
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as packed, \
                tarfile.open(fileobj=packed, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            modes = [(n, d, 0o755 if n == native.PORT_BINARY else 0o644) for n, d in entries]
            for name, data, mode in [*modes, ("node.key", key, 0o600)]:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), mode, now
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()


def agent_config(ws: Workspace, node: NodeRecord, *, slots: int, endpoint: tuple[str, int]) -> dict[str, object]:
    host, port = endpoint
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "node": node.id,
        "name": node.id,
        "scheduler": [address],
        "slots": slots,
        "ca": "ca.crt",
        "cert": "node.crt",
        "key": "node.key",
        "port_binary": native.PORT_BINARY,
        "releases": "../releases",
        "include": "../include",
        "heartbeat": HEARTBEAT,
        "log": "agent.log",
    }


def agent_payload(ws: Workspace, node: NodeRecord, *, slots: int, platform: str,
                  store: Store | None = None) -> AgentPayload:
    """What ``node``'s agent install consists of, for a node of ``platform`` (the store
    gives the workspace id; without one it is opened read-only)."""
    return _payload(ws, node, slots, platform, _facts(ws, store))


def _payload(ws: Workspace, node: NodeRecord, slots: int, platform: str, facts: _Facts) -> AgentPayload:
    config = json.dumps(agent_config(ws, node, slots=slots, endpoint=_endpoint(ws, node, facts)),
                        indent=2, sort_keys=True).encode() + b"\n"
    ca = pki.ca_cert_pem(ws)
    files = (*_agent_files(), (native.PORT_BINARY, native.port_runner(ws, platform)))
    digest = hashlib.sha256()
    for name, data in (*files, ("agent.json", config), ("ca.crt", ca)):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return AgentPayload(node.id, config, ca, files, digest.hexdigest())


def issue_bundle(ws: Workspace, payload: AgentPayload) -> bytes:
    cert, key = pki.issue_node_cert(ws, payload.node)
    return payload.bundle(cert, key)


# -- shell, run on the node (from $HOME) -----------------------------------------------------------


def look_command() -> str:
    """Prints the installed stamp after STAMP_MARK (and changes nothing)."""
    return f"echo {shlex.quote(STAMP_MARK)}\"$(cat {REMOTE_AGENT}/bundle.stamp 2>/dev/null || echo none)\""


def installed_stamp(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(STAMP_MARK):
            return line[len(STAMP_MARK):].strip()
    return "none"


def unpack_lines(payload: AgentPayload) -> list[str]:
    """Unpack an uploaded bundle, record its stamp, and start ``ensure`` in the
    background (``$ORCH_ENSURE``), so that it overlaps whatever the script does next
    (a release build).  For a ``set -e`` script; start_lines waits for it."""
    a = REMOTE_AGENT
    return [
        f"if [ -f {REMOTE_BUNDLE} ]; then",
        f"  rm -rf {a}/orch_agent {a}/src && tar -xzf {REMOTE_BUNDLE} -C {a} --no-same-owner && rm -f {REMOTE_BUNDLE}",
        "fi",
        f"echo {payload.stamp} > {a}/bundle.stamp",
        f"({_PYTHON} ensure {_CONFIG}) > {a}/ensure.out 2>&1 &",
        "ORCH_ENSURE=$!",
    ]


def start_lines(payload: AgentPayload) -> list[str]:
    """Wait for ``ensure``: it prints ``running`` or ``started`` once the supervisor
    runs.  For a ``set -e`` script, after unpack_lines."""
    out = f"{REMOTE_AGENT}/ensure.out"
    return [f'wait "$ORCH_ENSURE" || {{ cat {out}; exit 1; }}', f"cat {out}"]


def health_command() -> str:
    """True while the node's supervisor runs (its pid file names a live supervisor)."""
    pid = f"{REMOTE_AGENT}/agent.pid"
    return (f'test -s {pid} && kill -0 "$(cat {pid})" 2>/dev/null && '
            f'grep -qa -e supervise -e ensure "/proc/$(cat {pid})/cmdline"')


PLATFORM_MARK = "::orch-platform "


def _ensure_script(payload: AgentPayload | None) -> str:
    """One round trip when the node is current: check the stamp, ensure the supervisor.
    Without a payload (the node's platform is not known yet) it says the platform and
    asks for the bundle."""
    stale = f'[ "$(cat {REMOTE_AGENT}/bundle.stamp 2>/dev/null)" != {payload.stamp} ]' if payload else "true"
    return "\n".join([
        "set -e",
        f"mkdir -p {REMOTE_AGENT} && chmod 700 {REMOTE_AGENT}",
        f"echo {shlex.quote(PLATFORM_MARK)}\"$({native.PLATFORM_COMMAND})\"",
        f"if {stale}; then exit {NEED_BUNDLE}; fi",
        f"{_PYTHON} ensure {_CONFIG}",
    ])


def reported_platform(output: str) -> str | None:
    """The platform a node printed after PLATFORM_MARK, if it did."""
    for line in output.splitlines():
        if line.startswith(PLATFORM_MARK):
            return native.parse_platform(line[len(PLATFORM_MARK):])
    return None


def _install_script(payload: AgentPayload) -> str:
    return "\n".join(["set -e", *unpack_lines(payload), *start_lines(payload)])


# -- the engine's calls ------------------------------------------------------------------------


def slots_of(ws: Workspace, node: NodeRecord) -> int:
    """Ports per node: the family's workers_per_node, else its cpus (1 when the family
    is gone from the workspace)."""
    try:
        family = load_family(ws, node.family)
    except OrchError:
        return 1
    return family.workers_per_node or family.demands.cpus


def ensure_agents(ws: Workspace, store: Store | None, nodes: Sequence[NodeRecord], pool: SSHPool | None = None, *,
                  max_parallel: int = 32, timeout: float = 120.0) -> dict[str, str]:
    """Over SSH, make each node's agent current and its supervisor run.

    Node id -> ``"running"`` (it already was), ``"started"``, or the error text.  A node
    whose agent files are stale (or missing: bootstrapped before agents existed) gets
    the bundle (with the port runner for its platform, which bootstrap recorded, else
    the node reports it first), and the supervisor is restarted on the new code.
    Never raises for one node's failure.  Without a ``pool``, one is made for the
    call and closed after it."""
    facts = _facts(ws, store)
    if pool is None:
        with SSHPool() as own:
            return ensure_agents(ws, store, nodes, own, max_parallel=max_parallel, timeout=timeout)

    def one(node: NodeRecord) -> str:
        try:
            target = ssh_target(ws, node)
            assert pool is not None
            session = pool.session(target)
            platform = node.extra.get("platform")
            payload = _payload(ws, node, slots_of(ws, node), str(platform), facts) if platform else None
            result = session.run(f'cd "$HOME" && {_ensure_script(payload)}', timeout=timeout)
            if result.exited == NEED_BUNDLE:
                if payload is None:
                    reported = reported_platform(result.stdout)
                    if reported is None:
                        return f"error: node {node.id} did not say its platform: {result.tail(3)}"
                    payload = _payload(ws, node, slots_of(ws, node), reported, facts)
                _upload(session, ws, payload)
                result = session.run(f'cd "$HOME" && {_install_script(payload)}', timeout=timeout)
            return _outcome(result)
        except OrchError as exc:
            return f"error: {exc}"

    if not nodes:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(nodes)))) as executor:
        outcomes = list(executor.map(one, nodes))
    return {node.id: outcome for node, outcome in zip(nodes, outcomes, strict=True)}


def _upload(session: SSHSession, ws: Workspace, payload: AgentPayload) -> None:
    session.put_bytes(issue_bundle(ws, payload), REMOTE_BUNDLE)


def _outcome(result: Result) -> str:
    last = result.stdout.strip().splitlines()[-1:] or [""]
    if result.ok and last[0] in ("running", "started"):
        return last[0]
    tail = result.tail(5).replace("\n", " | ")
    return f"error: exit {result.exited}: {tail or 'no output'}"


def stop_agent(pool: SSHPool, node: NodeRecord | SSHTarget, *, ws: Workspace | None = None,
               timeout: float = 30.0) -> str:
    """End the node's supervisor, agent and ports; returns what the node said
    (``stopped (pid N)`` or ``not running``).  A NodeRecord needs ``ws`` (for the key)."""
    if isinstance(node, NodeRecord):
        if ws is None:
            raise ValueError("stop_agent needs ws= to reach a NodeRecord")
        target = ssh_target(ws, node)
    else:
        target = node
    command = (f'cd "$HOME" && if [ -f {REMOTE_AGENT}/agent.json ]; then {_PYTHON} stop {_CONFIG}; '
               "else echo not installed; fi")
    result = pool.run(target, command, timeout=timeout)
    if result.failed:
        raise RemoteError(f"node {target.name}: stopping the agent failed: {result.tail(5)}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


__all__ = [
    "AgentPayload",
    "agent_config",
    "agent_payload",
    "default_scheduler_port",
    "ensure_agents",
    "health_command",
    "issue_bundle",
    "look_command",
    "scheduler_endpoint",
    "scheduler_port",
    "start_lines",
    "stop_agent",
    "unpack_lines",
]
