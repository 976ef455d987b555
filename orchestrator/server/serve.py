"""Running the API: ``serve(ws, host, port)`` binds, picks TLS, writes ``.orch/serve.json``
and runs uvicorn in the foreground until SIGINT or SIGTERM.

- The default port depends only on the workspace id (10000..19999, below Linux's
  ephemeral ports and apart from the scheduler's 20000..29999); 0 takes any free port.
- On a loopback address the API is plain HTTP; on any other it is HTTPS with the
  scheduler's server certificate from the workspace CA (``pki.scheduler_cert``: CN
  ``orch-scheduler``, no host names), so clients trust ``.orch/pki/ca.crt`` and do not
  check the host name.
- ``.orch/serve.json`` (``{"pid", "url", "host", "port", "tls"}``) exists while the
  server runs; a clean shutdown (SIGINT, SIGTERM) removes it.  One server per
  workspace: a second ``serve`` is refused while the first one's pid lives (the file
  of a killed server is simply replaced).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Generator
from dataclasses import asdict
from typing import Any

import uvicorn

from orchestrator.errors import ConflictError, InputError
from orchestrator.server.client import Endpoint, running, serve_file
from orchestrator.server.middleware import DEFAULT_MAX_BODY
from orchestrator.state import Store
from orchestrator.workspace import Workspace

PORT_RANGE = (10000, 19999)


def default_port(workspace_id: str) -> int:
    """A port in 10000..19999 that depends only on the workspace id."""
    low, high = PORT_RANGE
    digest = hashlib.sha256(f"serve:{workspace_id}".encode()).hexdigest()
    return low + int(digest, 16) % (high - low + 1)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(host: str, port: int) -> tuple[Any, ...]:
    """The address to bind for ``host``:``port`` (0 = any free port); InputError naming
    the option when it is not one."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}: must be 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host!r}: {exc.strerror}", hint="give an IP address or a resolvable name") from exc
    return tuple(infos[0])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; InputError when it cannot be had."""
    family, kind, proto, _, address = resolve(host, port)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InputError(f"--port {port}: cannot listen on {host} port {port}: {exc.strerror}",
                         hint="pick another --port, or 0 for any free port") from exc
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, but a captured SIGINT/SIGTERM ends ``run`` normally (exit 0)
    instead of being raised again once the server has shut down."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _log_to_stderr() -> None:
    logger = logging.getLogger("orch")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def serve(ws: Workspace, *, host: str = "127.0.0.1", port: int | None = None,
          on_ready: Callable[[Endpoint], None] | None = None, log_level: str = "warning",
          health_grace: float | None = None, max_body_bytes: int | None = None) -> Endpoint:
    """Serve the API of ``ws`` in the foreground until SIGINT/SIGTERM; returns the
    endpoint it served on.  ``on_ready`` hears the endpoint once the socket listens.
    ``health_grace``: seconds a node's agent may be silent before the node is lost;
    ``max_body_bytes``: the largest request body (default 1 MiB)."""
    from orchestrator.server.app import create_app
    from orchestrator.server.auth import api_token

    resolve(host, 0 if port is None else port)  # bad input fails before the first write
    if health_grace is not None and not health_grace > 0:
        raise InputError(f"--health-grace {health_grace}: must be more than 0 seconds")
    if max_body_bytes is not None and max_body_bytes < 1:
        raise InputError(f"--max-body-bytes {max_body_bytes}: must be at least 1")
    ws.ensure_runtime()
    with Store.open(ws.state_db) as store:
        workspace_id = store.workspace_id
    chosen = default_port(workspace_id) if port is None else port
    other = running(ws)
    if other is not None and other.pid != os.getpid():
        raise ConflictError(f"orch serve (pid {other.pid}) already serves this workspace at {other.url}",
                            hint="one server per workspace (it runs the jobs); stop that one first")
    token = api_token(ws)  # made now, so a client can read it as soon as serve.json exists
    tls = not is_loopback(host)
    ssl_files: dict[str, str] = {}
    if tls:
        from orchestrator.deploy import pki

        crt, key = pki.scheduler_cert(ws)
        ssl_files = {"ssl_certfile": str(crt), "ssl_keyfile": str(key)}
    sock = bind(host, chosen)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    endpoint = Endpoint(os.getpid(), f"{'https' if tls else 'http'}://{shown}:{bound_port}", host, bound_port, tls)
    path = serve_file(ws)

    def remove_serve_file() -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()

    from orchestrator.scheduler.service import SchedulerService

    app = create_app(ws, token=token, on_shutdown=remove_serve_file, service=SchedulerService(ws),
                     health_grace=health_grace, max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", **ssl_files)  # type: ignore[arg-type]
    server = _Server(config)
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(endpoint)) + "\n")
        os.replace(tmp, path)
        if on_ready is not None:
            on_ready(endpoint)
        _log_to_stderr()
        server.run(sockets=[sock])
    finally:
        remove_serve_file()
        sock.close()
    return endpoint
