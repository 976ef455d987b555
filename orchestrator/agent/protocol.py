"""The wire protocol between the scheduler and a node agent.

Standard library only: this module ships to nodes with the agent (the agent imports it
relatively, as ``from .protocol import ...``).

The connection is TLS with mutual authentication: the agent dials the scheduler and
presents its node certificate; both sides trust only the workspace's CA.  Over it flow
*messages*, each a 5-byte header and a body:

    u32 body length (little-endian) | u8 kind | body

Control messages carry a JSON object (UTF-8).  The two hot messages carry the port
frames of ``frames.py`` unchanged, so the agent relays them without re-encoding:

    TASKS   (scheduler -> agent)  u32 port index | task frames (OTSK ...) for that port
    RESULTS (agent -> scheduler)  u32 port index | result frames (ORES ...) from that port

A port answers its tasks one by one, in order; the scheduler keeps, per port, the seqs
it sent and not yet got back.  When a port dies, the agent first relays every result the
port wrote, then sends PORT_DIED naming the task in flight (the first task the port was
sent and did not answer), then restarts the port and sends PORT_READY.  Tasks the dead
port was sent after the one in flight were never started: the scheduler queues them
again without counting an attempt.

The conversation:

    agent                                   scheduler
      HELLO {node, name, slots, releases, version, pid, platform}   ->
                                            <- WELCOME {session, heartbeat}
                                            <- LOAD {work, release, sha256, library,
                                                     function, ports: [i...], task_timeout}
      (release folder missing:) LOAD_FAILED {work, missing: true, reason} ->
                                            <- RELEASE (u32 json length | JSON {release,
                                                        sha256, build: [cmd...]} | tar.gz)

``platform`` (``linux-x86_64-glibc2.36``, see ``platforms.py``) picks what the
scheduler ships: the release's build for that platform (``sha256`` is the build's,
``build`` is empty: nothing runs on the node), or, for a release built on each node,
its source and the commands that build it.
                                            <- LOAD (again, at once: the agent handles
                                                     LOAD, UNLOAD and RELEASE in order, so
                                                     this one runs after the install)
      LOADED {work, ports: [i...]}          ->
                                            <- TASKS port | frames ...
      RESULTS port | frames ...             ->
      PORT_DIED {port, seq|null, reason}    ->
      PORT_READY {port}                     ->
      HEARTBEAT {}                          <-> HEARTBEAT {} (every ``heartbeat`` seconds)
                                            <- HEARTBEAT {heartbeat} (from now on, this
                                                     interval: a job's own, or back)
                                            <- EXEC {id, command, timeout, max_output}
      EXEC_DONE {id, exit, stdout, stderr,  ->
                 truncated, seconds, reason}
                                            <- UNLOAD {work}   (job finished: stop its ports)
      ERROR {reason} (either side, then close)

EXEC runs ``command`` with ``/bin/sh -c`` in the node user's home directory ($HOME),
stdin from /dev/null, in a session (and process group) of its own.  EXECs run at once,
concurrently with each other and with everything else (not in the LOAD/UNLOAD/RELEASE
order); each is answered by one EXEC_DONE with the same ``id`` (any JSON value, echoed),
in the order they finish.  ``timeout`` is in seconds (missing or null: 60; must be > 0);
past it the whole process group is SIGKILLed.  ``max_output`` caps stdout and stderr at
that many bytes each (missing or null: 1 MiB; at most 16 MiB); the rest is read and
dropped.  EXEC_DONE:

    exit       the exit status; -1 when the shell was killed by a signal (as ``orch exec``
               over SSH reports it); null when it timed out, could not start, or the EXEC
               was malformed
    stdout, stderr   the captured bytes decoded as UTF-8 with errors="replace"
    truncated  true when stdout or stderr was longer than ``max_output``
    seconds    wall time from start to finish (float)
    reason     "" when the command exited by itself with a status; else why not:
               "timed out after N s", "killed by signal N (SIGNAME)", "cannot start ...",
               "bad EXEC: ..."

The command's stdout and stderr are read until both close and the shell has exited, so a
background process that keeps them open counts against the timeout (as over SSH); one
that closed them (``cmd >/dev/null 2>&1 &``) outlives a finished EXEC.  When the
connection drops, every running EXEC's process group is SIGKILLed and no EXEC_DONE is
sent (the scheduler treats them as lost).  (An agent that is itself SIGKILLed cannot do
that: its EXECs, in sessions of their own, outlive it.)  EXEC came without a version
bump: an agent from before it takes kind 14 for a ProtocolError, answers ERROR and dials
again; ``ensure_agents`` replaces such an agent, whose code differs.

A side that hears nothing (not even a heartbeat) for three heartbeat intervals treats the
peer as lost.  When the connection drops, the agent kills its ports (dropping the tasks
they were sent) and dials again with exponential backoff; the scheduler has already
queued those tasks again elsewhere.  Results that still arrive for a task that another
node finished first are discarded: recording is first completion wins.
"""

from __future__ import annotations

import json
import struct
from typing import Any

PROTOCOL_VERSION = 1

HEADER = struct.Struct("<IB")
HEADER_LEN = HEADER.size  # 5
PORT_PREFIX = struct.Struct("<I")
MAX_MESSAGE = 256 << 20
"""The largest body either side accepts (a RELEASE carries a whole tarball)."""
EXEC_TIMEOUT = 60.0
"""Seconds an EXEC may run when it names no ``timeout``."""
EXEC_MAX_OUTPUT = 1 << 20
"""Bytes of stdout (and of stderr) an EXEC keeps when it names no ``max_output``."""
EXEC_OUTPUT_CAP = 16 << 20
"""The largest ``max_output``: twice this, JSON-escaped (6 bytes per byte at worst), fits
in MAX_MESSAGE."""

# Message kinds.
HELLO = 1
WELCOME = 2
HEARTBEAT = 3
LOAD = 4
LOADED = 5
LOAD_FAILED = 6
RELEASE = 7
TASKS = 8
RESULTS = 9
PORT_DIED = 10
PORT_READY = 11
UNLOAD = 12
ERROR = 13
EXEC = 14
EXEC_DONE = 15

KIND_NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", HEARTBEAT: "HEARTBEAT", LOAD: "LOAD", LOADED: "LOADED",
    LOAD_FAILED: "LOAD_FAILED", RELEASE: "RELEASE", TASKS: "TASKS", RESULTS: "RESULTS",
    PORT_DIED: "PORT_DIED", PORT_READY: "PORT_READY", UNLOAD: "UNLOAD", ERROR: "ERROR",
    EXEC: "EXEC", EXEC_DONE: "EXEC_DONE",
}

SCHEDULER_NAME = "orch-scheduler"
"""The common name of the scheduler's certificate; agents check it after the handshake."""


class ProtocolError(ValueError):
    """Bytes that break the protocol: an unknown kind, a body too large, bad JSON."""


def message(kind: int, body: bytes = b"") -> bytes:
    """One whole message."""
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"{KIND_NAMES[kind]} body of {len(body)} bytes is over the limit")
    return HEADER.pack(len(body), kind) + body


def control(kind: int, **fields: Any) -> bytes:
    """A control message with a JSON body."""
    return message(kind, json.dumps(fields, separators=(",", ":")).encode())


def port_message(kind: int, port: int, frames: bytes | bytearray | memoryview) -> bytes:
    """TASKS or RESULTS: the port index, then the frames (relayed unchanged)."""
    return HEADER.pack(PORT_PREFIX.size + len(frames), kind) + PORT_PREFIX.pack(port) + bytes(frames)


def release_message(header: dict[str, Any], tarball: bytes) -> bytes:
    """RELEASE: the JSON header's length, the header, then the tarball."""
    meta = json.dumps(header, separators=(",", ":")).encode()
    return message(RELEASE, PORT_PREFIX.pack(len(meta)) + meta + tarball)


def parse_header(header: bytes) -> tuple[int, int]:
    """(kind, body length) from the 5 header bytes; raises ProtocolError."""
    length, kind = HEADER.unpack(header)
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    if length > MAX_MESSAGE:
        raise ProtocolError(f"{KIND_NAMES[kind]} body of {length} bytes is over the limit")
    return kind, length


def parse_control(kind: int, body: bytes) -> dict[str, Any]:
    """A control message's JSON object; raises ProtocolError."""
    try:
        value = json.loads(body) if body else {}
    except ValueError as exc:
        raise ProtocolError(f"{KIND_NAMES.get(kind, kind)}: body is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{KIND_NAMES.get(kind, kind)}: body is not a JSON object")
    return value


def parse_port(body: bytes) -> tuple[int, memoryview]:
    """(port index, frames) of a TASKS or RESULTS body."""
    if len(body) < PORT_PREFIX.size:
        raise ProtocolError("port message shorter than its port index")
    (port,) = PORT_PREFIX.unpack_from(body)
    return port, memoryview(body)[PORT_PREFIX.size:]


def parse_release(body: bytes) -> tuple[dict[str, Any], memoryview]:
    """(header, tarball) of a RELEASE body."""
    if len(body) < PORT_PREFIX.size:
        raise ProtocolError("RELEASE shorter than its header length")
    (meta_len,) = PORT_PREFIX.unpack_from(body)
    end = PORT_PREFIX.size + meta_len
    if end > len(body):
        raise ProtocolError("RELEASE header runs past the message")
    return parse_control(RELEASE, body[PORT_PREFIX.size:end]), memoryview(body)[end:]


async def read_message(reader: Any) -> tuple[int, bytes]:
    """The next (kind, body) from an ``asyncio.StreamReader``; raises
    ``asyncio.IncompleteReadError`` at end of stream and ProtocolError on bad bytes."""
    kind, length = parse_header(await reader.readexactly(HEADER_LEN))
    body = await reader.readexactly(length) if length else b""
    return kind, body
