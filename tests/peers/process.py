"""The process plumbing every cloud's peer shares: on the peer's side, serving until
SIGTERM or SIGINT (:func:`serve_until_signalled`); on a test's side, starting
``python -m tests.peers.X`` and waiting for its ready line (:func:`start_module`), and
the running peer (:class:`PeerProcess`): its admin JSON calls to ``/_orch/...`` and
``stop()`` by its pid.  Each cloud's API stays in its own module."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar, Self

from tests.helpers.processes import stop_process

REPO = Path(__file__).resolve().parents[2]


# -- in the peer's process ---------------------------------------------------------------


class PeerHandler(BaseHTTPRequestHandler):
    """A peer's request handler: HTTP/1.1, GET, POST and DELETE to ``_serve``, the body
    by ``read_body``; each request a line on stderr if ``log_requests``."""

    protocol_version = "HTTP/1.1"
    log_requests = False

    def log_message(self, format: str, *args: Any) -> None:
        if self.log_requests:
            sys.stderr.write(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_DELETE = do_GET


def serve_until_signalled(server: HTTPServer, on_stop: Callable[[], None], ready: str, *,
                          poll_interval: float = 0.1) -> None:
    """Print ``ready`` (the line :func:`start_module` waits for) and serve until SIGTERM or
    SIGINT; then close the server and call ``on_stop`` (which destroys the peer's nodes)."""
    stopping = threading.Event()

    def stop(*_: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(ready, flush=True)
    try:
        server.serve_forever(poll_interval=poll_interval)
    finally:
        server.server_close()
        on_stop()


# -- from a test ------------------------------------------------------------------------


class PeerDidNotStart(RuntimeError):
    """The peer ended, or printed no ready line in time; ``log`` is its stderr so far."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def end(process: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """SIGTERM by pid (the peer destroys its nodes), SIGKILL if it hangs; close its pipes."""
    stop_process(process, timeout)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def start_module(module: str, args: list[str], log: Path, *, ready: str, what: str,
                 timeout: float = 30.0) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m MODULE ARGS`` from the repository (on its PYTHONPATH), its
    stderr appended to ``log``, and wait up to ``timeout`` seconds for a line of its
    stdout starting with ``ready``: returns the process and that line.  A peer that ends
    first or stays silent is stopped, and :class:`PeerDidNotStart` raised."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("ab") as err:
        process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    stdout = process.stdout
    assert stdout is not None
    found: list[str] = []

    def read() -> None:
        for line in stdout:
            if line.startswith(ready):
                found.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        end(process)
        text = log.read_text(errors="replace")
        raise PeerDidNotStart(f"the {what} peer did not start: {text[-2000:]}", text)
    stdout.close()
    return process, found[0]


class PeerProcess:
    """The base of a running peer (a dataclass with a ``process`` field): admin JSON
    calls to its ``/_orch/...`` paths at :attr:`admin_url` (with :meth:`ssl_context`
    for HTTPS), and ``stop()`` by its pid."""

    process: subprocess.Popen[str]
    STOP_TIMEOUT: ClassVar[float] = 30.0

    @property
    def admin_url(self) -> str:
        raise NotImplementedError

    def ssl_context(self) -> ssl.SSLContext | None:
        return None

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.admin_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30, context=self.ssl_context()) as answer:
            return json.loads(answer.read() or b"null")

    def faults(self, **faults: Any) -> Any:
        """Set faults (see the peer's docstring)."""
        return self._call("POST", "/_orch/faults", faults)

    def clear_faults(self) -> Any:
        return self._call("DELETE", "/_orch/faults")

    def state(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_orch/state"))

    def answering(self) -> Self:
        """This peer, once its ``/_orch/state`` answers (stopped if it does not)."""
        try:
            self.state()
        except OSError:  # urllib.error.URLError is one
            self.stop()
            raise
        return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM by pid (the peer destroys every node), then SIGKILL if it hangs."""
        end(self.process, self.STOP_TIMEOUT if timeout is None else timeout)

