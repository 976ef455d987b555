"""What the agent's modules share about failures: the timeout classes, and one line
saying why a connection or a call ended."""

from __future__ import annotations

import asyncio
import ssl

TIMEOUTS = (asyncio.TimeoutError, TimeoutError)  # one class from Python 3.11, two before


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the scheduler closed the connection"
    if isinstance(exc, TIMEOUTS):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) else text
