from __future__ import annotations

import orchestrator


def test_public_names_are_what_we_mean_to_publish() -> None:
    assert orchestrator.__all__ == sorted(orchestrator.__all__)
    assert set(orchestrator.__all__) == {"Cloud", "OrchError", "Workspace", "__version__"}
    for name in orchestrator.__all__:
        assert hasattr(orchestrator, name)
