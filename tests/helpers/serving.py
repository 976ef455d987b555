"""A real ``orch serve``: the server as a subprocess with a client, and a teardown
(``serving``) that stops the server and every node and checks that the shutdown was
clean, whether the test passed or not.  The workspace to serve: ``primes_workspace``
(tests/helpers/workspace.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from orchestrator.workspace import Workspace
from tests.helpers.cli import ORCH, orch


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


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
