"""Many nodes at once over SSH: a pool of open sessions (one per node, reused, shared
between threads) and the fan-out of a command with its per-node results.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from orchestrator.errors import RemoteError
from orchestrator.remote.ssh import NodeUnreachable, Result, SSHSession, SSHTarget, Timeouts


class FanOutResult(dict[str, "Result | RemoteError"]):
    """Node name -> Result or the RemoteError that stopped it (fabric's GroupResult)."""

    @property
    def succeeded(self) -> dict[str, Result]:
        return {name: r for name, r in self.items() if isinstance(r, Result) and r.ok}

    @property
    def failed(self) -> dict[str, Result | RemoteError]:
        return {name: r for name, r in self.items() if not (isinstance(r, Result) and r.ok)}

    def raise_on_failure(self) -> FanOutResult:
        """Self when every node succeeded; else raise FanOutFailed carrying all results."""
        if self.failed:
            raise FanOutFailed(self)
        return self


class FanOutFailed(RemoteError):
    """Some nodes of a fan-out failed; ``results`` still holds the successes."""

    def __init__(self, results: FanOutResult) -> None:
        self.results = results
        failures = ", ".join(
            f"{name} (exit {r.exited})" if isinstance(r, Result) else f"{name} ({type(r).__name__})"
            for name, r in sorted(results.failed.items())
        )
        super().__init__(f"{len(results.failed)} of {len(results)} nodes failed: {failures}")


class SSHPool:
    """One open session per node, reused by every call; safe to share between threads.

    >>> with SSHPool() as pool:                                          # doctest: +SKIP
    ...     results = pool.run_many(targets, "uptime")
    ...     print(results.succeeded.keys(), results.failed.keys())
    """

    def __init__(self, *, timeouts: Timeouts | None = None) -> None:
        self.timeouts = timeouts or Timeouts()
        self._sessions: dict[SSHTarget, SSHSession] = {}
        self._connecting: dict[SSHTarget, threading.Lock] = {}
        self._lock = threading.Lock()

    def session(self, target: SSHTarget) -> SSHSession:
        """The open session to ``target``, connecting (once, even when raced) if needed."""
        with self._lock:
            session = self._sessions.get(target)
            if session is not None and session.is_active:
                return session
            connecting = self._connecting.setdefault(target, threading.Lock())
        with connecting:
            with self._lock:
                session = self._sessions.get(target)
            if session is not None and session.is_active:
                return session
            if session is not None:
                session.close()
            session = SSHSession(target, timeouts=self.timeouts)
            with self._lock:
                self._sessions[target] = session
            return session

    def run(self, target: SSHTarget, command: str, **kwargs: Any) -> Result:
        """``session(target).run(command, **kwargs)``; a broken session is dropped."""
        try:
            return self.session(target).run(command, **kwargs)
        except NodeUnreachable:
            self.discard(target)
            raise

    def run_many(
        self,
        targets: Iterable[SSHTarget],
        command: str,
        *,
        max_parallel: int = 64,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> FanOutResult:
        """Run ``command`` on every target in parallel; never raises for a node's failure."""
        targets = list(targets)
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets share names: {sorted(n for n in set(names) if names.count(n) > 1)}")
        results = FanOutResult()
        if not targets:
            return results

        def one(target: SSHTarget) -> None:
            try:
                results[target.name] = self.run(target, command, timeout=timeout, env=env)
            except RemoteError as exc:
                results[target.name] = exc

        with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(targets)))) as pool:
            for future in [pool.submit(one, t) for t in targets]:
                future.result()  # a bug (not a RemoteError) surfaces here
        return FanOutResult((name, results[name]) for name in names)

    def discard(self, target: SSHTarget) -> None:
        with self._lock:
            session = self._sessions.pop(target, None)
        if session is not None:
            session.close()

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()

    def __enter__(self) -> SSHPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_all()
