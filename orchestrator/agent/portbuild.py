"""Building the port runner on the node: ``orch-port`` from the shipped ``port.c``.

Used by ``launch`` before the agent dials (so the first LOAD rarely waits) and by the
agent itself when a LOAD finds the runner missing or stale.  cc runs at nice 19 in a
session of its own, so that it takes only idle CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time

from .config import Config, Log

BUILD_TIMEOUT = 600.0


def build_port(cfg: Config, log: Log) -> str | None:
    """Build ``port_binary`` from ``port_source`` (with cc at nice 19) unless its stamp
    ``port_binary.sha256`` matches the source; None when it is ready, else why not.
    Without a ``port_source``, ``port_binary`` is used as it is."""
    source = cfg.port_source
    if source is None:
        return None
    binary = cfg.port_binary
    name = os.path.basename(binary)
    stamp = binary + ".sha256"
    tmp = os.path.join(os.path.dirname(binary), f".{name}.{os.getpid()}.new")
    try:
        # the same digest as orchestrator.deploy.agent_install.port_digest()
        digest = hashlib.sha256(_read(source) + b"\0" + _read(os.path.join(os.path.dirname(source), "orch_work.h")))
        if os.path.isfile(binary) and os.path.isfile(stamp) and _read(stamp).decode().strip() == digest.hexdigest():
            return None
        os.makedirs(os.path.dirname(binary), exist_ok=True)
        import shlex  # only for a build: an idle agent stays small
        import shutil
        import subprocess

        nice = ["nice", "-n", "19"] if shutil.which("nice") else []
        compiler = shlex.split(os.environ.get("CC") or "cc")
        started = time.monotonic()
        # Low priority for real: with autogroup scheduling (Linux's default for desktops
        # and many servers) nice only ranks processes within a session, so the build
        # gets a session of its own and lowers that session's autogroup too.
        argv = ["sh", "-c", 'echo 19 > /proc/self/autogroup 2>/dev/null; exec "$@"', "sh",
                *nice, *compiler, "-O2", "-std=c11", "-o", tmp, source, "-ldl"]
        done = subprocess.run(argv, cwd=os.path.dirname(source), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT, check=False, start_new_session=True)
        lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
        if done.returncode != 0:
            for line in lines[-10:]:
                log(f"building {name}: {line}")
            return f"building {name} failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}"
        os.replace(tmp, binary)
        with open(stamp, "w") as fh:
            fh.write(digest.hexdigest() + "\n")
    except Exception as exc:  # OSError, ValueError, subprocess.TimeoutExpired: all say why
        return f"cannot build the port runner: {exc}"
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    log(f"built {binary} from {os.path.basename(source)} ({digest.hexdigest()[:12]}) "
        f"in {time.monotonic() - started:.2f} s")
    return None


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()
