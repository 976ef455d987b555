"""orch: a multi-cloud deployment orchestrator with an embedded work engine."""

from __future__ import annotations

from orchestrator.errors import OrchError
from orchestrator.workspace import Workspace

__version__ = "0.1.0"

__all__ = ["OrchError", "Workspace", "__version__"]
