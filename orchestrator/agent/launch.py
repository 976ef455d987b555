"""The agent's first phase, light on purpose: no asyncio, no ssl.

``run`` (what ``python3 -m orch_agent run`` and the supervisor's child execute) builds
the port runner when its source changed, then waits until one of the schedulers
accepts a TCP connection, dialing with the agent's backoff, and only then imports
asyncio and ssl and starts the agent proper (``agent.py``).  A node whose scheduler is
not up (a spawn, when no job runs) so keeps an idle agent of a few MB that cost its
bootstrap almost nothing; when the scheduler is up, the first probe connects at once.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import sys
import time

from .config import PARENT_ENV, POKE, Config, ConfigError, Log
from .portbuild import build_port

PROBE_TIMEOUT = 5.0


class _Stop(Exception):
    """SIGTERM (or the supervisor gone) while the agent was still waiting."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing: the signal's number reaches the wakeup pipe."""


def wait_for_scheduler(cfg: Config, log: Log) -> None:
    """Return once a scheduler address accepts a TCP connection (closed at once: the
    agent proper dials again with TLS).  Raises _Stop when the supervisor is gone."""
    parent = os.environ.get(PARENT_ENV)
    failures, turn = 0, 0
    poke = getattr(signal, POKE)
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    previous_fd = signal.set_wakeup_fd(wake_w)
    previous = signal.signal(poke, _ignore)
    try:
        while True:
            if parent and parent.isdigit() and os.getppid() != int(parent):
                log(f"the supervisor (pid {parent}) is gone; stopping")
                raise _Stop("no supervisor")
            host, port = cfg.scheduler[turn % len(cfg.scheduler)]
            turn += 1
            try:
                socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
                return
            except OSError as exc:
                failures += 1
                if failures & (failures - 1) == 0:  # 1, 2, 4, 8, ...: a dead scheduler does not flood the log
                    log(f"scheduler {host}:{port}: {type(exc).__name__}: {exc} (attempt {failures}; retrying)")
            delay = min(cfg.backoff_cap, cfg.backoff_start * 2 ** min(failures - 1, 16))
            if _poked_during(wake_r, random.uniform(delay / 2, delay), poke):
                failures, turn = 0, 0  # dial every address again, now
    finally:
        signal.signal(poke, previous)
        signal.set_wakeup_fd(previous_fd)
        os.close(wake_r)
        os.close(wake_w)


def _poked_during(wake: int, seconds: float, poke: int) -> bool:
    """Sleep ``seconds`` unless POKE arrives first (its number on the wakeup pipe)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([wake], [], [], left)
        if readable:
            with contextlib.suppress(BlockingIOError):
                if poke in os.read(wake, 64):
                    return True
    return False


def run(config_path: str | os.PathLike[str]) -> int:
    """``python3 -m orch_agent run --config agent.json``: the agent, until SIGTERM."""
    try:
        cfg = Config.load(config_path)
    except ConfigError as exc:
        Log(None)(f"agent: {exc}")
        return 2
    log = Log(cfg.log)
    log(f"agent {cfg.node} starting (pid {os.getpid()}, python {sys.version.split()[0]}, "
        f"schedulers {', '.join(f'{h}:{p}' for h, p in cfg.scheduler)})")
    handlers = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        problem = build_port(cfg, log)
        if problem:
            log(problem)  # a LOAD tries again, and says why it cannot
        wait_for_scheduler(cfg, log)
    except _Stop:
        log(f"agent {cfg.node} stopped")
        return 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    from .agent import run_agent

    return run_agent(cfg, log)
