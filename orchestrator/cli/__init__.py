"""The ``orch`` command line: thin typer adapters over the engine."""
