"""What the tests against a real ``orch serve`` share: a workspace with the sample
release and a local ``workers`` family, the server as a subprocess with a client, and a
teardown (``serving``) that stops the server and every node and checks that the
shutdown was clean, whether the test passed or not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from orchestrator.deploy.releases import upload_release
from orchestrator.state import Store
from orchestrator.workspace import Workspace
from tests.conftest import REPO

ORCH = [sys.executable, "-m", "orchestrator"]
WORKERS = "release: primes\ncount: {count}\nworkers_per_node: 1\nplacement:\n  providers: [local]\n"


def primes_below(n: int) -> int:
    sieve = bytearray([1]) * n
    sieve[:2] = b"\0\0"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(range(i * i, n, i)))
    return sum(sieve)


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def primes_workspace(root: Path, *, count: int = 1, max_nodes: int = 8, family_extra: str = "",
                     upload: bool = True) -> Workspace:
    """A workspace at ``root``: ``releases/primes`` (uploaded unless ``upload`` is
    false), the ``local`` provider, and the ``workers`` family of ``count`` nodes
    (``family_extra`` is appended to its YAML)."""
    ws = Workspace.init(root)
    shutil.copytree(REPO / "releases" / "primes", ws.releases_src_dir / "primes",
                    ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
    (ws.providers_dir / "local.yaml").write_text(f"driver: local\nmax_nodes: {max_nodes}\n")
    (ws.families_dir / "workers.yaml").write_text(WORKERS.format(count=count) + family_extra)
    if upload:
        with Store.open(ws.state_db) as store:
            upload_release(ws, store, ws.releases_src_dir / "primes")
    return ws


def orch(ws: Workspace, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``orch ARGS`` as a subprocess in the workspace (wide, so tables do not wrap)."""
    return subprocess.run([*ORCH, *args], cwd=ws.root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def start_server(ws: Workspace, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any], Path]:
    """Start `orch serve ARGS` and wait for its .orch/serve.json (and a live /healthz)."""
    log = ws.root / f"serve-{time.monotonic_ns()}.log"
    serve_json = ws.runtime_dir / "serve.json"
    with log.open("w") as out:
        proc = subprocess.Popen([*ORCH, "serve", *args], cwd=ws.root, stdout=out, stderr=subprocess.STDOUT,
                                text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"orch serve exited {proc.returncode}: {log.read_text()}")
        try:
            info = json.loads(serve_json.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        if info.get("pid") == proc.pid:
            return proc, info, log
        time.sleep(0.05)
    stop_server(proc)
    raise AssertionError(f"orch serve wrote no serve.json in 30 s: {log.read_text()}")


def stop_server(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)


class Server:
    """A running `orch serve` subprocess and a client for it."""

    def __init__(self, ws: Workspace, proc: subprocess.Popen[str], info: dict[str, Any], log: Path) -> None:
        self.ws = ws
        self.proc = proc
        self.info = info
        self.log = log
        self.token = (ws.runtime_dir / "api-token").read_text().strip()
        self.client = httpx.Client(base_url=info["url"], timeout=120,
                                   headers={"Authorization": f"Bearer {self.token}"})

    @property
    def url(self) -> str:
        return str(self.info["url"])

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.client.post(path, json=body)

    def orch(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return orch(self.ws, *args, timeout=timeout)

    def job_done(self, job: str, timeout: float = 120) -> dict[str, Any]:
        """Wait until ``job`` ends; its status (asserted done)."""
        wait_until(lambda: self.get(f"/jobs/{job}").json()["state"] not in ("queued", "running"), timeout,
                   f"job {job} ends")
        status: dict[str, Any] = self.get(f"/jobs/{job}").json()
        assert status["state"] == "done", status
        return status


@contextmanager
def serving(ws: Workspace, *args: str) -> Iterator[Server]:
    """`orch serve --port 0 ARGS` for the block; afterwards the server is stopped
    (SIGTERM: exit 0, serve.json removed, no traceback in its log) and so is every node."""
    proc, info, log = start_server(ws, "--port", "0", *args)
    server = Server(ws, proc, info, log)
    try:
        yield server
    finally:
        server.client.close()
        code = stop_server(proc)
        stopped = orch(ws, "stop", "--all", timeout=120)
        assert code == 0, f"orch serve exited {code} on SIGTERM: {log.read_text()}"
        assert not (ws.runtime_dir / "serve.json").exists(), "serve.json survived a clean shutdown"
        assert "Traceback" not in log.read_text(), log.read_text()
        assert stopped.returncode == 0 or "name a FAMILY" in stopped.stderr, stopped.stderr
