"""Live progress for fleet commands: one line per node with its stage, then a summary."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

from rich.live import Live
from rich.table import Table

from orchestrator.cli.common import console, err_console

if TYPE_CHECKING:
    from orchestrator.fleet import FleetEvents

_STYLE = {"ready": "green", "failed": "red", "stopped": "dim", "stopping": "yellow", "not rolled": "yellow"}


class NodeProgress:
    """A rich Live table fed by FleetEvents callbacks from any thread."""

    def __init__(self, title: str, *, quiet: bool = False) -> None:
        self.title = title
        self.quiet = quiet
        self.stages: dict[str, tuple[str, float]] = {}
        self.notes: list[str] = []
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.live = console.is_terminal and not quiet
        self._live = Live(self._render(), console=console, refresh_per_second=8, transient=False)

    def events(self) -> FleetEvents:
        from orchestrator.fleet import FleetEvents

        return FleetEvents(stage=self.stage, note=self.note)

    def stage(self, node: str, stage: str) -> None:
        at = time.monotonic() - self.started
        with self._lock:
            self.stages[node] = (stage, at)
        if self.quiet:
            return
        if self.live:
            self._live.update(self._render())
        else:  # a log, not a screen: one line per change
            console.print(f"{at:7.2f}s  {node}  {stage}", markup=False)

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(text)
        if not self.quiet:
            err_console.print(text, markup=False)

    def _render(self) -> Table:
        table = Table(title=self.title, title_justify="left", header_style="bold")
        table.add_column("node")
        table.add_column("stage")
        table.add_column("at", justify="right")
        with self._lock:
            items = sorted(self.stages.items())
        for node, (stage, at) in items:
            style = _STYLE.get(stage, "cyan")
            table.add_row(node, f"[{style}]{stage}[/{style}]", f"{at:.2f}s")
        return table

    def __enter__(self) -> NodeProgress:
        if self.live:
            self._live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.live:
            self._live.update(self._render())
            self._live.stop()
