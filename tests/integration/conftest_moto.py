"""Fixtures for tests against the EC2 API served by a local moto server.

Load with ``pytest_plugins = ["tests.integration.conftest_moto"]``; helpers reach the
tests as fixtures (test modules do not import this module).  Every test gets its own
``moto_server`` on a free port, stopped by its pid in teardown whatever the outcome.
Providers reach it through ``tests.moto_ec2.MotoEC2NodeDriver`` (libcloud's stock EC2
driver plus moto's differences), registered as ``ec2moto`` through
``ORCH_DRIVER_PLUGINS`` in the environment, so that ``orch`` subprocesses find it too.

moto's instances have fake addresses: nothing here connects to them, and EC2
providers are registered with ``bootstrap: false``.  Workspaces keep their default
ed25519 fleet key: orch imports it as a key pair of its own (``orch-<workspace>-<digest>``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.ec2_faults import FaultProxy
from tests.moto_ec2 import FAKE_CREDENTIALS, PLUGIN, REGION, MotoServer, start_moto

REPO = Path(__file__).resolve().parents[2]

Instances = Callable[..., list[dict[str, Any]]]


@pytest.fixture
def ec2_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment EC2 tests run orch in (in-process, and inherited by subprocesses):
    the ``ec2moto`` plugin, the repository on PYTHONPATH, fake AWS credentials."""
    monkeypatch.setenv("ORCH_DRIVER_PLUGINS", PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return dict(os.environ)


@pytest.fixture
def moto_server(tmp_path: Path, ec2_env: dict[str, str]) -> Iterator[MotoServer]:
    """A fresh moto server on a free port; stopped (by pid) afterwards."""
    server = start_moto(folder=tmp_path / "moto")
    try:
        yield server
    finally:
        server.stop()
        assert server.process.poll() is not None, "moto_server survived its stop"


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A fault-injecting EC2 proxy in front of ``moto_server`` (no faults until told)."""
    proxy = FaultProxy(moto_server.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def ec2_client(server: MotoServer) -> Any:
    return boto3.client(
        "ec2", region_name=REGION, endpoint_url=server.endpoint,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def ec2(moto_server: MotoServer) -> Any:
    """A boto3 EC2 client for ``moto_server``: what the instances really look like."""
    return ec2_client(moto_server)


@pytest.fixture
def ec2_instances(ec2: Any) -> Instances:
    """``ec2_instances(workspace_id=None, states=())``: moto's instances as boto3 describes
    them (optionally only those with our workspace tag, in these states), each with its
    tags as a dict under ``"TagMap"``."""

    def find(*, workspace_id: str | None = None, states: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        filters = []
        if workspace_id is not None:
            filters.append({"Name": "tag:orch-workspace", "Values": [workspace_id]})
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        found = []
        for reservation in ec2.describe_instances(Filters=filters)["Reservations"]:
            for instance in reservation["Instances"]:
                found.append({**instance, "TagMap": {t["Key"]: t["Value"] for t in instance.get("Tags", [])}})
        return found

    return find
