"""Network odds and ends for tests."""

from __future__ import annotations

import socket
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_on_free_port(engine: Any) -> int:
    """Start the scheduler ``engine`` on a free port of 127.0.0.1; the port.  A port taken
    between the probe and the start is tried again with another."""
    for _ in range(20):
        port = free_port()
        try:
            await engine.start(["127.0.0.1"], port)
        except OSError:  # taken meanwhile
            continue
        return port
    raise AssertionError("no free port on 127.0.0.1")
