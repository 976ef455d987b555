"""Bootstrap one node over SSH: pinned host key, the node's platform, the release's
build for it (or its source, for releases built on each node), checksum, unpack,
setup, node config, the agent, health check, hooks.

Every step first looks at what the node already has, so bootstrapping a node twice
(after a crash, or to roll out a release) redoes only what changed.  The full log of
each node goes to ``.orch/logs/<node>.log``.

On the node, everything lives under ``~/orch``::

    releases/<sha256>.tar.gz     uploaded tarballs (a build, or a source), checked against their sha256
    releases/<name>-<version>/   unpacked (and, for build_on: node, built); .orch-sha256 marks it done
    current -> releases/<name>-<version>
    node.json                    node id, family, release, platform, dependencies' addresses
    include/orch_work.h          only for releases built on the node
    agent/                       the node agent and the port runner (see agent_install.py)

The first command reads the node's platform, what release it has, and the agent's
stamp, and changes nothing: a node with no build for its platform fails there, with
nothing installed.  (A new node whose driver recorded its platform, as local and netns
nodes have this machine's, skips that round trip: it has nothing yet.)  Then SFTP
sends what is missing (the build for the node's platform, the agent bundle with the
port runner built for it), and one script
unpacks the release and starts the agent's supervisor in the background, then links
``current`` and checks health.  Nodes need no compiler and no make: releases are built
once per platform (``builds.py``).  The node is healthy only while its supervisor
runs.  A node the agent could not dial back from (no gateway recorded by its driver
while orch.yaml has no ``scheduler_address``) is bootstrapped without the agent, and
says so in its log; ``agent_install.ensure_agents`` reports it.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import NodeFamily, ReleaseManifest
from orchestrator.deploy import agent_install, native
from orchestrator.deploy.agent_install import AgentPayload
from orchestrator.deploy.builds import Artifact, ReleaseBuilds
from orchestrator.deploy.native import NoBuildForPlatform
from orchestrator.errors import ConfigError, OrchError, RemoteError
from orchestrator.remote.pool import SSHPool
from orchestrator.remote.ssh import Result, SSHSession, SSHTarget
from orchestrator.state import NodeRecord, ReleaseRecord
from orchestrator.workspace import Workspace

REMOTE_ROOT = "orch"

Progress = Callable[[str, str], None]
"""``progress(node_id, stage)``: called as each bootstrap step starts."""


BEFORE_SWITCH = frozenset({"connect", "pre", "platform", "upload", "verify", "unpack", "build", "setup"})
"""Steps that end before the node switches releases (its ``current`` link and node.json):
a node whose bootstrap failed in one of them still runs what it ran before.  (``agent``
comes both before and after the switch, and a timed-out ``install`` may have got
anywhere, so they are not here.)"""


class BootstrapFailed(RemoteError):
    """A bootstrap step failed on a node; ``log`` is the node's full log file."""

    def __init__(self, node: str, step: str, detail: str, log: Path, tail: str = "") -> None:
        self.node, self.step, self.log, self.tail = node, step, log, tail
        super().__init__(f"node {node}: bootstrap step {step!r} failed: {detail}", hint=f"full log: {log}")

    @property
    def before_switch(self) -> bool:
        """Whether it failed before the node switched releases (see ``BEFORE_SWITCH``)."""
        return self.step in BEFORE_SWITCH


@dataclass(frozen=True)
class BootstrapPlan:
    """Everything one node's bootstrap needs, decided before it starts."""

    node: NodeRecord
    target: SSHTarget
    family: NodeFamily
    release: ReleaseRecord
    manifest: ReleaseManifest
    tarball: bytes  # the release's source: what a node gets when the release is built on each node
    builds: ReleaseBuilds | None = None  # the release's builds by platform (None: the node builds the source)
    dependencies: Mapping[str, list[str]] = field(default_factory=dict)  # family -> addresses
    seed: str | None = None
    config_hash: str = ""
    workspace: Workspace | None = None  # for the agent; when None, found from the fleet key's path
    agent: bool = True  # install the node agent and require its supervisor in the health check

    @property
    def slots(self) -> int:
        return self.family.workers_per_node or self.family.demands.cpus


def plan_workspace(plan: BootstrapPlan) -> Workspace | None:
    """The plan's workspace, or the one whose fleet key the plan's target uses."""
    if plan.workspace is not None:
        return plan.workspace
    key = plan.target.key_file
    if len(key.parents) < 3:
        return None
    ws = Workspace(key.parents[2])
    return ws if ws.ssh_key == key and ws.settings_file.is_file() else None


class NodeLog:
    """Append-only log of one node's bootstrap, safe from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            for line in text.rstrip("\n").splitlines() or [""]:
                fh.write(f"{stamp} {line}\n")

    def result(self, result: Result) -> None:
        self.write(f"$ {result.command}\n{result.stdout}{result.stderr}[exit {result.exited}]")

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass(frozen=True)
class Installed:
    """What a bootstrap put on the node: its platform and the tarball it runs."""

    platform: str
    sha256: str


def bootstrap_node(plan: BootstrapPlan, pool: SSHPool, log: NodeLog, progress: Progress,
                   *, timeout: float | None = None) -> Installed:
    """Bring ``plan.node`` from booted to serving its release; raises BootstrapFailed.

    Round trips are few on purpose (a 16-node spawn on 2 cores has well under a
    second): one command looks at what the node has, SFTP sends what is missing, and
    one script does verify -> unpack -> setup -> link -> health, marking each step in
    its output so the log and any failure name the step.
    """
    deadline = time.monotonic() + (timeout or plan.family.bootstrap.timeout_seconds)
    node = plan.node.id
    release = plan.release
    folder = f"{REMOTE_ROOT}/releases/{release.name}-{release.version}"
    step = "connect"

    def run(command: str, *, check: bool = True) -> Result:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BootstrapFailed(node, step, "ran out of time", log.path, log.tail())
        result = session.run(f'cd "$HOME" && {command}', timeout=remaining)
        log.result(result)
        if check and result.failed:
            raise BootstrapFailed(node, step, f"`{command}` exited {result.exited}", log.path, result.tail(15))
        return result

    log.write(f"== bootstrap {node} ({plan.node.path}) with {release.ref} sha256 {release.sha256}")
    try:
        ws = plan_workspace(plan) if plan.agent else None
        if plan.agent and ws is None:
            log.write("no workspace known for this plan: the node agent is not installed")
        progress(node, step)
        session: SSHSession = pool.session(plan.target)
        step = "pre"
        for command in plan.family.bootstrap.pre:
            progress(node, step)
            run(command)
        step = "platform"
        progress(node, step)
        known = plan.node.extra.get("platform")
        if known and not plan.node.config_hash:  # a new node whose driver knows its platform: nothing to look at
            platform, installed, output = str(known), "none", ""
        else:
            look = f"{native.PLATFORM_COMMAND} && (cat {folder}/.orch-sha256 2>/dev/null || echo none)"
            output = run(look + (f" && {agent_install.look_command()}" if ws is not None else "")).stdout
            lines = output.splitlines()
            platform = native.parse_platform(lines[0] if lines else "")
            installed = lines[1].strip() if len(lines) > 1 else "none"
        try:
            shipped = _what_to_ship(plan, platform)
            agent = _agent_for(plan, ws, platform, log)
        except NoBuildForPlatform as exc:
            log.write(f"!! {exc}{f' ({exc.hint})' if exc.hint else ''}")
            raise BootstrapFailed(node, step, f"{exc.message}: run `{exc.hint}`", log.path) from exc
        log.write(f"platform {platform}; has {installed}; gets {shipped.sha256}")
        step = "upload"
        progress(node, step)
        blob = f"{REMOTE_ROOT}/releases/{shipped.sha256}.tar.gz"
        session.makedirs(f"{REMOTE_ROOT}/releases")
        if plan.builds is None:  # built on the node: it needs the header
            session.makedirs(f"{REMOTE_ROOT}/include")
            session.put(native.header(), f"{REMOTE_ROOT}/include/orch_work.h")
        if installed != shipped.sha256:
            data = shipped.load()
            session.put_bytes(data, blob)
            log.write(f"uploaded {len(data)} bytes to {blob}")
        if ws is not None and agent is not None and agent_install.installed_stamp(output) != agent.stamp:
            session.makedirs(agent_install.REMOTE_AGENT, 0o700)
            bundle = agent_install.issue_bundle(ws, agent)
            session.put_bytes(bundle, agent_install.REMOTE_BUNDLE)
            log.write(f"uploaded the agent ({len(bundle)} bytes, stamp {agent.stamp[:12]})")
        session.put_bytes(json.dumps(node_config(plan, shipped), indent=2, sort_keys=True).encode(),
                          f"{REMOTE_ROOT}/node.json.new")  # moved into place with `current`
        step = "install"
        progress(node, step)
        result = run(install_script(plan, shipped.sha256, agent), check=False)
        if result.failed:
            step = _last_step(result.stdout) or step
            raise BootstrapFailed(node, step, f"exited {result.exited}", log.path, result.tail(15))
        step = "post"
        for command in plan.family.bootstrap.post:
            progress(node, step)
            run(command)
    except BootstrapFailed:
        raise
    except OrchError as exc:  # RemoteError, or the workspace's CA or settings (agent)
        log.write(f"!! {step}: {exc}")
        raise BootstrapFailed(node, step, str(exc).splitlines()[0], log.path, log.tail()) from exc
    log.write(f"== {node} ready")
    return Installed(platform, shipped.sha256)


def _what_to_ship(plan: BootstrapPlan, platform: str) -> Artifact:
    """The build for the node's platform, or the source when the node builds it."""
    if plan.builds is None:
        return Artifact("source", plan.release.sha256, lambda: plan.tarball)
    return plan.builds.for_platform(platform, node=plan.node.id)


def _agent_for(plan: BootstrapPlan, ws: Workspace | None, platform: str, log: NodeLog) -> AgentPayload | None:
    if ws is None:
        return None
    try:
        return agent_install.agent_payload(ws, plan.node, slots=plan.slots, platform=platform)
    except ConfigError as exc:  # no scheduler address for this provider: no agent yet
        log.write(f"the node agent is not installed: {exc}")
        return None


STEP_MARK = "::orch-step "


def install_script(plan: BootstrapPlan, sha256: str, agent: AgentPayload | None = None) -> str:
    """The shell script that installs the release on the node, idempotently.

    ``sha256`` names the uploaded tarball: the build for the node's platform (or the
    source, which the node then builds).  A release already there (its
    ``.orch-sha256`` matches) is only re-linked and checked; each step prints
    ``::orch-step NAME`` before it starts.  The node switches releases at ``configure``:
    ``current`` and node.json (uploaded as ``node.json.new``) change together, so a
    failure before it leaves the node on what it ran (``BEFORE_SWITCH``).  With ``agent``, the agent's bundle (when
    one was uploaded) is unpacked first and its supervisor started in the background,
    overlapping the release steps; the agent step waits for it.
    """
    release = plan.release
    folder = f"{REMOTE_ROOT}/releases/{release.name}-{release.version}"
    blob = f"{REMOTE_ROOT}/releases/{sha256}.tar.gz"
    q = shlex.quote
    build = plan.manifest.build if plan.builds is None else []

    def step(name: str) -> str:
        return f"echo {q(STEP_MARK + name)}"

    lines = [
        "set -e",
        *([step("agent"), *agent_install.unpack_lines(agent)] if agent else []),
        f'if [ "$(cat {folder}/.orch-sha256 2>/dev/null)" != {sha256} ]; then',
        f"  {step('verify')}",
        f"  echo {sha256}'  '{blob} | sha256sum -c --quiet -",
        f"  {step('unpack')}",
        f"  rm -rf {folder}.new {folder} && mkdir -p {folder}.new",
        f"  tar -xzf {blob} -C {folder}.new --strip-components=1 --no-same-owner && mv {folder}.new {folder}",
        *([f"  {step('build')}"] if build else []),
        *[f'  (cd {folder} && ORCH_INCLUDE="$HOME/orch/include" {command})' for command in build],
        *([f"  {step('setup')}"] if plan.manifest.setup else []),
        *[f"  (cd {folder} && {command})" for command in plan.manifest.setup],
        f"  echo {sha256} > {folder}/.orch-sha256",
        "else",
        f"  echo {q(release.ref + ' already installed on the node')}",
        "fi",
        step("configure"),
        f"ln -sfn releases/{release.name}-{release.version} {REMOTE_ROOT}/current",
        f"mv -f {REMOTE_ROOT}/node.json.new {REMOTE_ROOT}/node.json",
        *([step("agent"), *agent_install.start_lines(agent)] if agent else []),
        step("health"),
        health_check_command(plan, agent=agent is not None),
    ]
    return "\n".join(lines)


def _last_step(output: str) -> str | None:
    marks = [line[len(STEP_MARK):].strip() for line in output.splitlines() if line.startswith(STEP_MARK)]
    return marks[-1] if marks else None


def node_config(plan: BootstrapPlan, shipped: Artifact) -> dict[str, Any]:
    """What the node learns from its parent (and only from it)."""
    node = plan.node
    return {
        "platform": shipped.platform,
        "installed_sha256": shipped.sha256,
        "node": node.id,
        "family": node.family,
        "provider": node.provider,
        "path": node.path,
        "address": node.address,
        "release": plan.release.ref,
        "release_sha256": plan.release.sha256,
        "library": plan.manifest.library,
        "functions": [f.name for f in plan.manifest.functions],
        "workers": plan.family.workers_per_node or plan.family.demands.cpus,
        "dependencies": {k: sorted(v) for k, v in plan.dependencies.items()},
        "seed": plan.seed,
        "config_hash": plan.config_hash,
    }


def health_check_command(plan: BootstrapPlan, *, agent: bool = True) -> str:
    """The node is healthy when its work library was built, its config names it and
    this release (node.json is written sorted, two-space indented: see above), and
    (``agent``) the agent's supervisor runs.
    """
    library = shlex.quote(f"{REMOTE_ROOT}/current/{plan.manifest.library}")
    names = shlex.quote(f'"node": "{plan.node.id}",')
    release = shlex.quote(f'"release_sha256": "{plan.release.sha256}",')
    config = f"{REMOTE_ROOT}/node.json"
    check = f"test -f {library} && grep -qF {names} {config} && grep -qF {release} {config}"
    return f"{check} && {agent_install.health_command()}" if agent else check
