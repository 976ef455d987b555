"""Before and between connections (orchestrator/agent/launch.py, agent.py): with no scheduler
the agent waits small (no asyncio, no ssl) and dials in when one comes; refused dials back
off exponentially with jitter."""

from __future__ import annotations

import signal
from pathlib import Path

from orchestrator.deploy import pki
from orchestrator.workspace import Workspace
from tests.helpers.agent import MakeHome, session_of, wait_until
from tests.helpers.agent_peer import AgentPeer
from tests.helpers.net import free_port


def test_with_no_scheduler_the_agent_waits_small_then_dials_in(ws: Workspace, make_home: MakeHome) -> None:
    port = free_port()
    home = make_home(ws, f"127.0.0.1:{port}")
    agent = home.start()
    wait_until(lambda: "(attempt 4; retrying)" in home.log_text(), what="a few refused dials")
    maps = Path(f"/proc/{agent.pid}/maps").read_text()
    assert "_asyncio" not in maps and "_ssl" not in maps  # waiting costs no asyncio, no ssl
    with AgentPeer(pki.server_ssl_context(ws), port=port) as late:
        assert session_of(late, home, timeout=5).hello["pid"] == agent.pid  # backoff is capped at 2 s
    stopper = make_home(ws, f"127.0.0.1:{port}", node="n2")
    waiting = stopper.start()
    wait_until(lambda: "attempt 1;" in stopper.log_text(), what="the first refused dial")
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(5) == 0 and "stopped" in stopper.log_text()


def test_dialing_backs_off_exponentially_with_jitter_up_to_two_seconds(ws: Workspace, make_home: MakeHome) -> None:
    with AgentPeer(pki.server_ssl_context(ws), reject=True) as rejecting:
        home = make_home(ws, rejecting.address)
        home.start()
        wait_until(lambda: len(rejecting.accepts) >= 8, 20, "eight dials")
        gaps = [b - a for a, b in zip(rejecting.accepts, rejecting.accepts[1:], strict=False)][:7]
    # after the k-th failure the agent waits uniform(d/2, d), d = min(2, 0.1 * 2**(k-1)); plus a TLS dial
    for k, gap in enumerate(gaps, start=1):
        d = min(2.0, 0.1 * 2 ** (k - 1))
        assert d / 2 - 0.02 < gap < d + 0.4, (k, gaps)
    assert gaps[5] > 0.95 and gaps[6] > 0.95  # capped at 2 s, never below 1 s there
    assert len(home.log_text().splitlines()) < 12  # failures logged at 1, 2, 4, 8, ... only
