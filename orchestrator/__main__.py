"""``python -m orchestrator``: the same as the ``orch`` command."""

from orchestrator.cli.app import run

run()
