"""The examples, run as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.processes import commands_with
from tests.helpers.workspace import REPO

pytestmark = [pytest.mark.slow, pytest.mark.sshd,
              pytest.mark.skipif(os.geteuid() != 0, reason="the Azure peer serves port 443 and the clouds' nodes "
                                                         "port 22: root only")]


def test_the_multi_cloud_example_runs_primes_exactly_across_six_providers() -> None:
    """examples/multi-cloud/run.sh: the five clouds' peers and the private pool, plan,
    spawn, the primes job on every cloud checked against a direct count, stop; its last
    line says so, and nothing of it is left (no peer, no node, no scratch folder)."""
    before = set(Path("/tmp").glob("orch-multi-cloud.*"))
    done = subprocess.run(["bash", str(REPO / "examples" / "multi-cloud" / "run.sh")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "160"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    last = done.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"multi-cloud: (\d+) nodes on (\d+) providers \(([a-z, ]+)\), result exact", last)
    assert found, last
    nodes, count, names = int(found[1]), int(found[2]), found[3].split(", ")
    assert count >= 6 and nodes >= count and len(names) == count, last
    assert set(names) == {"private", "aws", "openstack", "gce", "azure", "do"}, last
    assert "Traceback" not in output
    assert set(Path("/tmp").glob("orch-multi-cloud.*")) == before, "the scratch folder was left behind"
    assert commands_with("orch-multi-cloud.") == [], "a peer or a node of the example still runs"
