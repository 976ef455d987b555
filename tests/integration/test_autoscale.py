"""Autoscaling under a real `orch serve` on local nodes: a family with min 1 and max 4
grows to 4 under a large job, the job finishes correctly, the family drops back to 1
once its nodes are idle, and the events explain every step."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.state import Store
from tests.helpers.cli import orch as run_orch
from tests.helpers.primes import primes_below
from tests.helpers.serving import start_server, stop_server
from tests.helpers.workspace import primes_workspace

pytestmark = [pytest.mark.sshd, pytest.mark.slow]
N = 160_000_000  # long enough for the autoscaler (it ticks each second) to see the job wait


def test_a_large_job_scales_the_family_to_its_maximum_and_idle_nodes_go(tmp_path: Path) -> None:
    ws = primes_workspace(tmp_path / "ws", family_extra="scaling: {min: 1, max: 4, queued_tasks_per_node: 4, "
                                                          "idle_seconds: 3, cooldown_seconds: 1}\n")

    def orch(*args: str) -> subprocess.CompletedProcess[str]:
        return run_orch(ws, *args)

    def live() -> int:
        with Store.open(ws.state_db) as store:
            return sum(1 for n in store.list_nodes(family="workers") if n.state.live)

    def ready() -> int:
        with Store.open(ws.state_db) as store:
            return sum(1 for n in store.list_nodes(family="workers") if n.state.value == "ready")

    proc = None
    try:
        proc, info, log = start_server(ws, "--port", "0")
        token = (ws.runtime_dir / "api-token").read_text().strip()
        with httpx.Client(base_url=info["url"], timeout=60, headers={"Authorization": f"Bearer {token}"}) as client:
            deadline = time.monotonic() + 60  # min 1: the autoscaler brings the first node up by itself
            while ready() < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert ready() == 1, log.read_text()
            job = client.post("/jobs", json={"work": "primes:count_primes", "input": f"0:{N}",
                                             "family": "workers", "target_task_seconds": 0.1}).json()["job"]
            most = 0
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                most = max(most, live())
                if client.get(f"/jobs/{job}").json()["state"] not in ("queued", "running"):
                    break
                time.sleep(0.2)
            status = client.get(f"/jobs/{job}").json()
            assert status["state"] == "done", status
            scaled = [(e["kind"], e["reason"]) for e in client.get("/events", params={"limit": 10000}).json()
                      if e["kind"].startswith("autoscale")]
            assert most == 4, (most, scaled, log.read_text()[-3000:])
            deadline = time.monotonic() + 60  # idle 3 s, cooldown 1 s: back to the minimum
            while live() > 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert live() == 1
            counts = [int(x) for x in client.get(f"/jobs/{job}/result").content.split()]
            events = client.get("/events", params={"limit": 10000}).json()
        assert sum(counts) == primes_below(N)
        scale = [(e["kind"], e["reason"]) for e in events if e["kind"].startswith("autoscale.")]
        kinds = [k for k, _ in scale]
        assert ("autoscale.up", "0 live node(s), below the minimum of 1") in scale, scale
        assert any(k == "autoscale.up" and "waiting tasks per node" in r for k, r in scale), scale
        assert any(k == "autoscale.down" and "idle for 3 s" in r for k, r in scale), scale
        assert kinds.count("autoscale.done") == kinds.count("autoscale.up") + kinds.count("autoscale.down"), scale
        assert "autoscale.hold" in kinds  # decisions not to scale are recorded too
        shown = json.loads(orch("autoscale", "status", "--json").stdout)
        assert shown[0]["family"] == "workers" and (shown[0]["min"], shown[0]["max"], shown[0]["live"]) == (1, 4, 1)
        assert stop_server(proc, signal.SIGTERM) == 0, log.read_text()
    finally:
        if proc is not None:
            stop_server(proc)
        orch("stop", "--all")
