"""Processes, found through /proc independently of the code under test."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any


def processes_of(node_id: object, node_dir: str | Path) -> list[int]:
    """Live (non-zombie) pids that belong to a node, found independently of the driver:
    ORCH_NODE_ID=<id> in their environment, its sshd_config in their command line, and
    the descendants of those (sshd's connection processes carry neither)."""
    marker = f"ORCH_NODE_ID={node_id}".encode()
    config = str(Path(node_dir) / "sshd_config").encode()
    found: set[int] = set()
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
        if state in "ZX":
            continue
        parents[int(proc.name)] = int(ppid)
        if marker in environ or config in cmdline:
            found.add(int(proc.name))
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def commands_with(marker: str) -> list[int]:
    """Live (non-zombie) pids whose command line holds ``marker`` (this process left out)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a process we started, by its pid (SIGTERM, then SIGKILL)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
