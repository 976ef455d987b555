"""orch: a multi-cloud deployment orchestrator with an embedded work engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.errors import OrchError
from orchestrator.workspace import Workspace

if TYPE_CHECKING:
    from orchestrator.sdk import Cloud as Cloud

__version__ = "0.1.0"

__all__ = ["Cloud", "OrchError", "Workspace", "__version__"]


def __getattr__(name: str) -> Any:
    """``orchestrator.Cloud`` (the Python cloud API), imported on first use so that
    ``import orchestrator`` stays cheap."""
    if name == "Cloud":
        from orchestrator.sdk import Cloud

        return Cloud
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
