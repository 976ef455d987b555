"""How a wheel of orch carries the C side it needs at run time (pyproject.toml holds the rest).

The sources stay in ``worker_native/``, the repository's C side.  A wheel (``pip wheel .``,
``pip install .``) gets, as package data under ``orchestrator/native/`` (the layout
``orchestrator/deploy/native.py`` looks for)::

    include/orch_work.h                 the work-function ABI header (`orch release include-dir`)
    port.c, PROTOCOL.md                 the port runner's source, and the protocol it speaks
    PLATFORM/orch-port                  the port runner, built here for this machine's platform
    PLATFORM/orch-port.source-sha256    native.port_digest() of the source it was built from

Without a C compiler here the wheel has no ``orch-port``: orch builds it on first use, as
it does for any platform it has no build for.  Holding a binary, the wheel is a platform
wheel (``py3-none-linux_x86_64``: the port runner links no Python, so any Python 3 will do).

An editable install (``pip install -e .``, scripts/setup.sh) copies and builds nothing:
native.py then finds the checkout's ``worker_native/``, as it always has.

Nothing of ``orchestrator`` is imported here (an isolated build has none of its
dependencies): the compiler flags are read from native.py's source, and the platform
comes from ``orchestrator/agent/platforms.py`` loaded by path (standard library only).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 (pip's build environment then has the wheel package)
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
SOURCES = ROOT / "worker_native"
PACKAGED = ("port.c", "include/orch_work.h", "PROTOCOL.md")  # relative to worker_native/ and native/
COMPILE_TIMEOUT = 600


def _native_settings() -> tuple[str, list[str], list[str]]:
    """PORT_BINARY, PORT_FLAGS and PORT_LIBS as orchestrator/deploy/native.py defines them."""
    tree = ast.parse((ROOT / "orchestrator" / "deploy" / "native.py").read_text())
    found = {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name)
             and target.id in ("PORT_BINARY", "PORT_FLAGS", "PORT_LIBS")}
    if len(found) != 3:
        raise RuntimeError("orchestrator/deploy/native.py no longer defines PORT_BINARY, PORT_FLAGS and PORT_LIBS")
    return str(found["PORT_BINARY"]), [str(f) for f in found["PORT_FLAGS"]], [str(f) for f in found["PORT_LIBS"]]


def _host_platform() -> str:
    """orchestrator.agent.platforms.host_platform(), from that file alone."""
    spec = importlib.util.spec_from_file_location("_orch_platforms", ROOT / "orchestrator" / "agent" / "platforms.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.host_platform())


def _say(message: str) -> None:
    print(f"orch native: {message}", flush=True)


def build_native(target: Path) -> list[Path]:
    """Fill ``target`` (the build's ``orchestrator/native/``) and return the files written."""
    shutil.rmtree(target, ignore_errors=True)  # nothing stale from an earlier build
    written = []
    for name in PACKAGED:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SOURCES / name, target / name)
        written.append(target / name)
    binary, flags, libs = _native_settings()
    # native.port_digest(): the port runner's source and the header it includes
    digest = hashlib.sha256((target / "port.c").read_bytes() + b"\0" + (target / PACKAGED[1]).read_bytes())
    cc = shlex.split(os.environ.get("CC") or "cc")
    if shutil.which(cc[0]) is None:
        _say(f"no C compiler ({cc[0]}): the wheel has no {binary}; orch builds it on first use")
        return written
    platform = _host_platform()
    with tempfile.TemporaryDirectory(prefix="orch-port-") as scratch:
        out = Path(scratch) / binary
        argv = [*cc, *flags, f"-I{target / 'include'}", "-o", str(out), str(target / "port.c"), *libs]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            _say(f"building {binary} failed (exit {done.returncode}: {last[0]}): the wheel has none; "
                 "orch builds it on first use")
            return written
        folder = target / platform
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, folder / binary)
    os.chmod(folder / binary, 0o755)
    (folder / f"{binary}.source-sha256").write_text(digest.hexdigest() + "\n")
    _say(f"built {binary} for {platform}")
    return [*written, folder / binary, folder / f"{binary}.source-sha256"]


class BuildPyWithNative(build_py):
    """build_py, plus the C side into ``orchestrator/native/`` (not for editable installs)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self._native = build_native(Path(self.build_lib) / "orchestrator" / "native")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if self.editable_mode:
            return outputs
        return outputs + [str(path) for path in getattr(self, "_native", [])]


class PlatformWheel(bdist_wheel):
    """Tagged for this machine's platform but any Python 3: orch-port links no Python."""

    def get_tag(self) -> tuple[str, str, str]:
        python, abi, platform = super().get_tag()
        return ("py3", "none", platform) if not self.root_is_pure else (python, abi, platform)


class BinaryDistribution(Distribution):
    """The wheel holds a binary, so it is not pure (py3-none-any would install anywhere)."""

    def has_ext_modules(self) -> bool:
        return True


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildPyWithNative, "bdist_wheel": PlatformWheel})
