"""Engine modules imported on first use, so `orch --version` or `orch nodes` don't pay
for libcloud and paramiko (~0.4 s of start-up) unless the command needs them.

    if TYPE_CHECKING:
        from orchestrator import fleet
    else:
        fleet = lazy("orchestrator.fleet")
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        return getattr(module, attr)


def lazy(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when an attribute is first read."""
    return _LazyModule(name)
