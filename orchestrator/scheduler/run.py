"""What the engine holds while a job runs: the job's run (what is out, what is back,
what is written), its tasks, the connected agents and their ports, and the outcome.

Plain data with the few methods that read it; the engine (``engine.py``) changes it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.agent.frames import HEADER_LEN, TASK_HEADER, TASK_MAGIC, encode_task
from orchestrator.scheduler.isolation import Isolation
from orchestrator.scheduler.sinks import Record, Sink
from orchestrator.scheduler.sizing import Sizer
from orchestrator.scheduler.spec import JobSpec
from orchestrator.scheduler.workmodules import WorkModule
from orchestrator.state import JobState

MAX_WINDOW = 200_000
"""Tasks made but not yet written out, at most: a slow task holds back only this many."""
EventSink = Callable[[str, dict[str, Any]], None]


class Task:
    """A task, kept as its first frame (attempt 1), which is also how the store keeps it."""

    __slots__ = ("attempts", "avoid", "error", "frame", "origin", "seq", "size")

    def __init__(self, seq: int, size: float, frame: bytes, attempts: int = 0) -> None:
        self.seq, self.size, self.frame, self.attempts = seq, size, frame, attempts
        self.avoid: str | None = None
        self.error = ""
        self.origin: int | None = None
        """Where the task starts in the input, when its data does not say (file modules, isolating)."""

    @classmethod
    def make(cls, seq: int, size: float, data: bytes, attempts: int = 0) -> Task:
        """(Packed directly: seq, size and data come from the engine and its work module,
        already checked, and encode_task's checks cost as much as the packing.)"""
        return cls(seq, size, TASK_HEADER.pack(TASK_MAGIC, seq, 1, size, len(data)) + data, attempts)

    def frame_for_try(self) -> bytes:
        """The frame to send now: attempt = tries so far + 1."""
        if not self.attempts:
            return self.frame
        return encode_task(self.seq, self.attempts + 1, self.size, self.frame[HEADER_LEN:])


class Port:
    __slots__ = ("index", "inflight", "ready")

    def __init__(self, index: int) -> None:
        self.index = index
        self.ready = True
        self.inflight: deque[Task] = deque()


@dataclass(eq=False)
class Agent:
    """One connected agent (one node)."""

    node: str
    name: str
    family: str
    slots: int
    writer: asyncio.StreamWriter
    platform: str | None = None  # as the agent reported it in HELLO
    sizer: Sizer | None = None
    ports: dict[int, Port] = field(default_factory=dict)
    last_heard: float = field(default_factory=time.monotonic)
    heartbeat: float = 1.0
    """The interval the agent was told (WELCOME, or a HEARTBEAT that changed it)."""
    lost: bool = False
    loaded: bool = False
    release_sent: bool = False
    excluded: str = ""
    done: int = 0
    reported_slow: bool = False
    history: list[float] = field(default_factory=list)
    """The elapsed seconds of this agent's first HISTORY successful tasks (sizing checks)."""

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


@dataclass
class ReleaseInfo:
    """What an agent needs to load the job's work: the release's build for the agent's
    platform, or (a release built on each node) its source and build commands."""

    folder: str  # name-version, the folder under ~/orch/releases
    sha256: str  # of the source
    library: str
    build: list[str]
    tarball: Callable[[], bytes]
    builds: dict[str, tuple[str, Callable[[], bytes]]] | None = None  # platform -> (sha256, bytes); None: on nodes
    ref: str = ""  # name@version, for messages

    def for_platform(self, platform: str | None) -> tuple[str, list[str], Callable[[], bytes]]:
        """(sha256, build commands, tarball) for an agent of ``platform``; LookupError
        (its text a one-line reason with the fix) when the release has no build for it."""
        if self.builds is None:
            return self.sha256, self.build, self.tarball
        if platform in self.builds:
            sha, load = self.builds[platform]
            return sha, [], load
        built = ", ".join(sorted(self.builds)) or "no platform"
        raise LookupError(f"the node is {platform or 'of an unknown platform'} and {self.ref or self.folder} is "
                          f"built for {built}: orch release build {self.ref} --platform {platform or 'PLATFORM'}")


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    retried: int = 0
    discarded: int = 0
    port_deaths: int = 0
    nodes_lost: int = 0
    split: int = 0  # tasks and pieces cut in halves after failing every attempt
    pieces_failed: int = 0  # pieces (or whole tasks, when isolating) failed at the floor

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class JobRun:
    """One job's state while it runs: what is out, what is back, what is written."""

    def __init__(self, job_id: str, spec: JobSpec, module: WorkModule, sink: Sink, release: ReleaseInfo,
                 *, next_write: int, generated: int, checkpoint: dict[str, Any] | None,
                 counters: dict[str, int] | None = None) -> None:
        self.id, self.spec, self.module, self.sink, self.release = job_id, spec, module, sink, release
        self.next_write = next_write
        self.generated = generated
        self.checkpoint = checkpoint
        self.outstanding: dict[int, Task] = {}
        self.retry: deque[Task] = deque()
        self.records: dict[int, Record] = {}
        self.buffered = 0
        self.exhausted = False
        self.uncommitted = False
        self.counters = Counters(**(counters or {}))
        self.failure = ""
        self.started = time.monotonic()
        self.where: dict[str, str] = {}
        """node id -> "running" or why it left the job (for `orch job status`)."""
        self.sizes: dict[str, float] = {}
        """node id -> its current task size (for `orch job status` and the dashboard)."""
        self.isolation = (Isolation(module, floor=spec.isolate_floor)
                          if spec.isolate_failures and spec.on_task_failure == "continue" and module.can_split
                          else None)
        """Failing tasks cut in pieces (see isolation.py); None when the job does not isolate."""

    def paused(self) -> bool:
        """Backpressure: too much output waits for an earlier task."""
        return (self.buffered > self.spec.max_unflushed_bytes
                or self.generated - self.next_write >= MAX_WINDOW)

    def finished(self) -> bool:
        return self.exhausted and not self.outstanding and not self.records

    def progress(self) -> dict[str, Any]:
        """What the store keeps of this run (``jobs.progress``)."""
        return {
            "position": self.module.position(),
            "generated": self.generated,
            "next_write": self.next_write,
            "checkpoint": self.checkpoint,
            "counters": self.counters.as_dict(),
            "nodes": self.where,
            "sizes": {node: float(f"{size:.4g}") for node, size in self.sizes.items()},
            "scheduler": {"pid": os.getpid(), "host": socket.gethostname()},
        }


@dataclass
class Finished:
    """The tasks one message finished, to store in one go."""

    accepted: list[tuple[int, int, bytes]] = field(default_factory=list)  # ok results: seq, elapsed ns, output
    failed: list[tuple[int, int, str]] = field(default_factory=list)  # seq, attempts, reason
    pieces: list[tuple[int, bytes]] = field(default_factory=list)  # ok pieces: their task's seq, result frame
    max_seq: int = -1
    all_accepted: bool = True


@dataclass(frozen=True)
class Outcome:
    state: JobState
    reason: str
    counters: dict[str, int]
    seconds: float
