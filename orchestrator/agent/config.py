"""agent.json and the agent's log file: standard library only, and light to import
(the supervisor and ``status`` use them without loading asyncio or ssl).

``agent.json``::

    {"node": "w1-5d0c", "name": "w1-5d0c", "scheduler": ["127.0.0.1:24511"], "slots": 2,
     "ca": "ca.crt", "cert": "node.crt", "key": "node.key", "port_binary": "../bin/orch-port",
     "port_source": "src/port.c", "releases": "../releases", "include": "../include",
     "heartbeat": 5, "log": "agent.log"}

Relative paths are relative to the folder of agent.json.  ``include`` (the folder of
``orch_work.h`` for release builds) defaults to ``../include``, ``log`` to ``agent.log``.
With ``port_source`` (port.c, with orch_work.h beside it), the agent builds
``port_binary`` from it whenever ``port_binary.sha256`` does not match the source;
without it, ``port_binary`` is used as it is.
"""

from __future__ import annotations

import json
import os
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing costs start-up time on every node
if TYPE_CHECKING:
    from typing import Any

BACKOFF_START = 0.1  # seconds before dialing again after the first failure; doubles per failure
BACKOFF_CAP = 2.0  # ... up to this; each wait is uniform(d/2, d)
POKE = "SIGUSR1"  # sent by `ensure` when a scheduler is listening: dial now, backoff forgotten
PARENT_ENV = "ORCH_AGENT_PARENT"
"""Set by the supervisor for its child: the pid the agent watches (it ends when that is gone)."""


class ConfigError(Exception):
    """agent.json is missing, malformed, or lacks a field."""


class Config:
    """agent.json; relative paths are relative to its folder.  Paths are plain strings
    (absolute, resolved): pathlib is not imported on the light path."""

    def __init__(self, path: str, raw: dict[str, Any]) -> None:
        here = os.path.dirname(os.path.realpath(path))

        def file(key: str, default: str | None = None) -> str:
            value = raw.get(key, default)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{path}: {key!r} must be a path")
            return os.path.realpath(os.path.join(here, os.path.expanduser(value)))

        try:
            self.path = path
            self.folder = here
            self.node = str(raw["node"])
            self.name = str(raw.get("name") or raw["node"])
            schedulers = raw["scheduler"]
            if isinstance(schedulers, str):
                schedulers = [schedulers]
            self.scheduler = [parse_address(str(a)) for a in schedulers]
            if not self.scheduler:
                raise ConfigError(f"{path}: 'scheduler' names no address")
            self.slots = int(raw.get("slots", 1))
            self.heartbeat = float(raw.get("heartbeat", 5.0))
            self.backoff_start = float(raw.get("backoff_start", BACKOFF_START))
            self.backoff_cap = float(raw.get("backoff_cap", BACKOFF_CAP))
        except KeyError as exc:
            raise ConfigError(f"{path}: {exc.args[0]!r} is missing") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if self.heartbeat <= 0:
            raise ConfigError(f"{path}: 'heartbeat' must be positive")
        if not 0 < self.backoff_start <= self.backoff_cap:
            raise ConfigError(f"{path}: 'backoff_start' and 'backoff_cap' must be positive, start <= cap")
        self.ca = file("ca")
        self.cert = file("cert")
        self.key = file("key")
        self.port_binary = file("port_binary")
        self.port_source = file("port_source") if raw.get("port_source") else None
        self.releases = file("releases")
        self.include = file("include", "../include")
        self.log = file("log", "agent.log")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Config:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                raw = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: not a JSON object")
        return cls(path, raw)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"scheduler address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Log:
    """One line per event, appended to the log file (kept under ``max_bytes`` by
    moving it to ``.1``).  Lines are rare, so the file is opened for each."""

    def __init__(self, path: str | None, *, max_bytes: int = 8 << 20) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def __call__(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp} [{os.getpid()}] {text}\n"
        if self.path is None:
            sys.stderr.write(line)
            return
        try:
            with open(self.path, "a", encoding="utf-8", errors="replace") as fh:
                fh.write(line)
                size = fh.tell()
            if size > self.max_bytes:
                os.replace(self.path, self.path + ".1")
        except OSError:
            sys.stderr.write(line)


