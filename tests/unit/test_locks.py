"""``orchestrator.locks.exclusive``: threads and processes take turns; a dead holder's
lock is free at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from orchestrator.locks import exclusive


def test_threads_take_turns_and_a_waiter_hears_who_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "a.lock"
    inside: list[int] = []
    overlaps: list[int] = []
    waits: list[str] = []

    def hold(n: int) -> None:
        with exclusive(path, on_wait=waits.append):
            inside.append(n)
            if len(inside) > 1:
                overlaps.append(n)
            time.sleep(0.05)
            inside.remove(n)

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert overlaps == []
    assert waits and set(waits) <= {f"pid {os.getpid()}", "unknown"}  # unknown: looked before the holder wrote
    assert path.read_text() == f"pid {os.getpid()}\n"


def test_another_process_waits_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    path = tmp_path / "b.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from orchestrator.locks import exclusive\n"
         "with exclusive(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        waits: list[str] = []
        got = threading.Event()

        def take() -> None:
            with exclusive(path, on_wait=waits.append):
                got.set()

        taker = threading.Thread(target=take)
        taker.start()
        assert not got.wait(0.5)  # the other process holds it
        assert waits == [f"pid {holder.pid}"]
        os.kill(holder.pid, signal.SIGKILL)
        assert got.wait(5)  # the kernel dropped the dead holder's lock
        taker.join(5)
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
