"""Talking to a running ``orch serve`` from this machine (the CLI's side), standard library only.

``running(ws)`` reads ``.orch/serve.json`` (the server writes it while it runs) and
checks that its process lives; ``call(ws, method, path, body)`` sends one request with
the workspace token, trusting the workspace CA when the server speaks HTTPS (its
certificate names no host: the host name is not checked).  The CLI uses the server for
what only the server can do (commands through the agents it holds) and works on its own
otherwise.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import RemoteError
from orchestrator.workspace import Workspace

SERVE_FILE = "serve.json"
TOKEN_FILE = "api-token"


@dataclass(frozen=True)
class Endpoint:
    pid: int
    url: str
    host: str
    port: int
    tls: bool


def serve_file(ws: Workspace) -> Path:
    return ws.runtime_dir / SERVE_FILE


def running(ws: Workspace) -> Endpoint | None:
    """The server that serves ``ws`` now, from .orch/serve.json (None when none, or when
    its process is gone)."""
    try:
        data = json.loads(serve_file(ws).read_text())
        endpoint = Endpoint(**data)
        os.kill(endpoint.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return endpoint
    except (OSError, ValueError, TypeError):
        return None
    return endpoint


def call(ws: Workspace, endpoint: Endpoint, method: str, path: str, body: Any = None,
         timeout: float = 600.0) -> Any:
    """One JSON request to the server; its JSON answer.  RemoteError (one line) when the
    server cannot be reached or answers an error."""
    token = (ws.runtime_dir / TOKEN_FILE).read_text().strip()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{endpoint.url}{path}", data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    context = None
    if endpoint.tls:
        context = ssl.create_default_context(cafile=str(ws.runtime_dir / "pki" / "ca.crt"))
        context.check_hostname = False
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError):
            error = exc.reason
        raise RemoteError(f"orch serve at {endpoint.url} answered {exc.code}: {error}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RemoteError(f"orch serve at {endpoint.url} cannot be reached: {exc}",
                          hint="stop it, or remove .orch/serve.json if that server is gone") from None
