"""A thin test adapter: libcloud's stock EC2 driver, talking to a local ``moto_server``.

The product drives EC2 through libcloud's own ``EC2NodeDriver`` code; this subclass
changes only what moto does differently from AWS, nothing in the calls themselves:

- **signature version 4**: libcloud signs us-east-1 requests with version 2, which
  moto's server does not accept; the driver defaults to ``signature_version="4"``.
- **the XML namespace**: moto answers ``xmlns="http://ec2.amazonaws.com/doc/2016-11-15"``
  where AWS (and libcloud's xpaths) have a trailing slash; the response puts it back.
- **error documents**: AWS answers ``<Response><Errors><Error><Code/><Message/>``
  without a namespace; moto puts its namespace on it, or answers IAM errors as
  ``<ErrorResponse>`` with a third child (``<Type>``), on which libcloud's
  ``code, message = list(err)`` raises ValueError.  The response rewrites moto's error
  into AWS's shape and lets libcloud's own ``parse_error`` classify it (so
  ``AuthFailure`` is still ``InvalidCredsError``, and codes lead the message).
- **DescribeInstances in full**: moto pages it at 100 reservations even without
  ``MaxResults`` (AWS then answers in full) and libcloud's ``list_nodes`` reads only the
  first page; the connection asks moto for every result.
- **list numbering**: moto reads ``ResourceId.N`` / ``Tag.N.Key`` lists from 1; libcloud's
  ``ex_create_tags``/``ex_delete_tags`` number them from 0.  The connection renumbers a
  list that starts at 0 (lists that start at 1, like every call on the product's
  path, are sent unchanged).

Use it as ``driver: ec2moto`` with ``ORCH_DRIVER_PLUGINS=ec2moto=tests.helpers.moto_ec2:MotoEC2NodeDriver``
(:data:`PLUGIN`; :func:`ec2_provider_yaml` writes such a registration).  Start a server
with :func:`start_moto`: it loads only moto's default AMIs (``MOTO_AMIS_PATH``), so
that ``DescribeImages`` answers in milliseconds instead of seconds, and waits until
moto's EC2 backend is loaded.  moto's instances have fake addresses: never connect to
them.  This module is imported by ``orch`` subprocesses: keep it free of heavy imports.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from libcloud.compute.drivers.ec2 import NAMESPACE, EC2Connection, EC2NodeDriver, EC2Response

from tests.helpers.net import free_port
from tests.helpers.processes import stop_process

MOTO_NAMESPACE = NAMESPACE.rstrip("/")

# AMIs the test server knows (moto's own default AMIs; ids are stable across moto runs).
UBUNTU_AMI = "ami-1e749f67"
"""An Ubuntu image in moto's default set: the image test providers boot."""


class MotoEC2Response(EC2Response):
    """libcloud's EC2 response, reading moto's namespace and moto's error documents."""

    def parse_body(self) -> Any:
        self.body = _with_aws_namespace(str(self.body or ""))
        return super().parse_body()  # type: ignore[no-untyped-call]

    def parse_error(self) -> Any:
        self.body = _as_aws_error(str(self.body or ""))
        return super().parse_error()  # type: ignore[no-untyped-call]


def _with_aws_namespace(body: str) -> str:
    return body.replace(f'xmlns="{MOTO_NAMESPACE}"', f'xmlns="{NAMESPACE}"', 1)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _as_aws_error(body: str) -> str:
    """moto's error document in AWS's shape: no namespace, Code and Message only."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return body  # not XML: libcloud reports it as it is
    errors = [e for e in root.iter() if _local(e.tag) == "Error"]
    if not errors:
        return body
    out = ET.Element("Response")
    listed = ET.SubElement(out, "Errors")
    for error in errors:
        fields = {_local(child.tag): child.text or "" for child in error}
        item = ET.SubElement(listed, "Error")
        ET.SubElement(item, "Code").text = fields.get("Code", "")
        ET.SubElement(item, "Message").text = fields.get("Message", "")
    return ET.tostring(out, encoding="unicode")


_LIST_ITEM = re.compile(r"^(?P<name>[A-Za-z]+)\.(?P<index>\d+)(?P<rest>(\..*)?)$")


def number_from_one(params: Mapping[str, Any]) -> dict[str, Any]:
    """Query parameters with every list that libcloud numbered from 0 numbered from 1.

    >>> number_from_one({"ResourceId.0": "i-1", "Tag.0.Key": "a", "Tag.1.Key": "b", "InstanceId.1": "i-2"})
    {'ResourceId.1': 'i-1', 'Tag.1.Key': 'a', 'Tag.2.Key': 'b', 'InstanceId.1': 'i-2'}
    """
    from_zero = {m["name"] for key in params if (m := _LIST_ITEM.match(key)) and m["index"] == "0"}
    renumbered: dict[str, Any] = {}
    for key, value in params.items():
        match = _LIST_ITEM.match(key)
        if match and match["name"] in from_zero:
            key = f"{match['name']}.{int(match['index']) + 1}{match['rest']}"
        renumbered[key] = value
    return renumbered


MOTO_ALL_RESULTS = "1000000"
"""``MaxResults`` for a DescribeInstances that AWS would answer in full (see ``every_result``)."""


def every_result(params: Mapping[str, Any]) -> dict[str, Any]:
    """Query parameters that make moto answer a DescribeInstances in full, as AWS does.

    Without ``MaxResults`` AWS returns every reservation; moto returns the first 100 and a
    NextToken, which libcloud's ``list_nodes`` does not follow (so instances past the
    100th would vanish from orch's view).  moto refuses MaxResults with instance ids.

    >>> every_result({"Action": "DescribeInstances"})["MaxResults"]
    '1000000'
    >>> "MaxResults" in every_result({"Action": "DescribeInstances", "InstanceId.1": "i-1"})
    False
    """
    found = dict(params)
    if found.get("Action") == "DescribeInstances" and "MaxResults" not in found and \
            not any(str(k).startswith("InstanceId.") for k in found):
        found["MaxResults"] = MOTO_ALL_RESULTS
    return found


class MotoEC2Connection(EC2Connection):
    """libcloud's EC2 connection with moto's response handling, 1-based lists and
    DescribeInstances answered in full."""

    responseCls = MotoEC2Response

    def request(self, action: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(params, Mapping):
            params = every_result(number_from_one(params))
        return super().request(action, params, *args, **kwargs)  # type: ignore[no-untyped-call]


class MotoEC2NodeDriver(EC2NodeDriver):
    """libcloud's ``EC2NodeDriver`` for a moto server (signature version 4 by default)."""

    connectionCls = MotoEC2Connection
    name = "Amazon EC2 (moto)"
    # EC2's own declaration (STOCK["ec2"], by the driver's type).  moto's instances have
    # made-up addresses: a registration bootstraps them only behind tests/peers/ec2.py,
    # which backs each one with a real node and reports its address.

    def __init__(self, key: str, secret: str | None = None, secure: bool = True, host: str | None = None,
                 port: int | None = None, region: str = "us-east-1", token: str | None = None,
                 signature_version: str | None = "4", **kwargs: Any) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            key, secret=secret, secure=secure, host=host, port=port, region=region, token=token,
            signature_version=signature_version, **kwargs)


# -- registrations and a moto server for tests ------------------------------------------

PLUGIN = "ec2moto=tests.helpers.moto_ec2:MotoEC2NodeDriver"
"""``ORCH_DRIVER_PLUGINS`` value that registers this adapter as driver ``ec2moto``."""
REGION = "us-east-1"

PRICES = {"t4g.nano": 0.0042, "t3a.nano": 0.0047, "t3.nano": 0.0052, "t2.nano": 0.0058, "t3.micro": 0.0104}
"""Hourly prices the test registrations give a few small sizes; the rest keep libcloud's."""


def ec2_provider_yaml(port: int, *, priority: int = 100, labels: tuple[str, ...] = ("public",),
                      max_nodes: int | None = None, image: str = UBUNTU_AMI, backed: bool = False) -> str:
    """``providers/NAME.yaml`` for an EC2 account served on 127.0.0.1:``port`` (moto, or a
    fault proxy in front of it).  Its nodes are not bootstrapped (moto's addresses are
    made up) unless ``backed``: behind tests/peers/ec2.py each instance is a real node,
    logged in to as root."""
    data: dict[str, Any] = {
        "driver": "ec2moto",
        "bootstrap": backed,
        **({"ssh_user": "root"} if backed else {}),
        "labels": list(labels),
        "priority": priority,
        "options": {"region": REGION, "host": "127.0.0.1", "port": port, "secure": False},
        "credentials": {"key": "env:AWS_ACCESS_KEY_ID", "secret": "env:AWS_SECRET_ACCESS_KEY"},
        "image": image,
        "prices": PRICES,
    }
    if max_nodes is not None:
        data["max_nodes"] = max_nodes
    return json.dumps(data, indent=2) + "\n"


MOTO_SERVER = Path(sys.executable).with_name("moto_server")
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAORCHTESTKEY00000", "AWS_SECRET_ACCESS_KEY": "orch-test-secret"}
"""Fake credentials for tests (moto accepts anything unless IAM auth is enforced)."""


@dataclass
class MotoServer:
    """A running ``moto_server``: its process, endpoint and the port it listens on."""

    process: subprocess.Popen[bytes]
    endpoint: str
    port: int
    log: Path

    def stop(self) -> None:
        stop_process(self.process)


Instances = Callable[..., list[dict[str, Any]]]
"""The ``ec2_instances`` fixture: ``ec2_instances(workspace_id=None, states=())``."""


def ec2_client(server: MotoServer) -> Any:
    """A boto3 EC2 client for ``server`` (boto3 imported here: orch subprocesses import
    this module for the plugin and need none of it)."""
    import boto3

    return boto3.client(
        "ec2", region_name=REGION, endpoint_url=server.endpoint,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def amis_file(folder: Path) -> Path:
    """moto's default AMIs (a few dozen) as a file for ``MOTO_AMIS_PATH``: without it
    moto also loads ~1,300 "latest" AMIs per region and DescribeImages takes seconds."""
    path = folder / "moto-amis.json"
    if not path.exists():
        data = gzip.decompress((resources.files("moto") / "ec2/resources/amis.json.gz").read_bytes())
        amis = json.loads(data)
        assert any(a["ami_id"] == UBUNTU_AMI for a in amis), "moto's default AMIs changed"
        path.write_text(json.dumps(amis))
    return path


def start_moto(port: int | None = None, *, folder: Path, enforce_auth: bool = False,
               timeout: float = 30.0) -> MotoServer:
    """Start ``moto_server`` on 127.0.0.1 and wait until it answers.

    ``enforce_auth``: moto checks every request's credentials against its IAM
    (``INITIAL_NO_AUTH_ACTION_COUNT=0``), so unknown keys are refused.
    """
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MOTO_AMIS_PATH": str(amis_file(folder))}
    env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    if enforce_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    log = folder / f"moto-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    server = MotoServer(process, endpoint, port, log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                pass
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout:.0f} s") from None
            time.sleep(0.1)
            continue
        try:
            _warm_up(endpoint)
        except BaseException:
            server.stop()
            raise
        return server


def _warm_up(endpoint: str) -> None:
    """One EC2 call, so moto imports its EC2 backend (seconds) before a test's timings."""
    request = urllib.request.Request(
        f"{endpoint}/?Action=DescribeRegions&Version=2016-11-15",
        headers={"Authorization": "AWS4-HMAC-SHA256 Credential=AKIAORCHWARMUP000000/20240101/us-east-1/ec2/"
                                  "aws4_request, SignedHeaders=host, Signature=0"})
    try:
        with urllib.request.urlopen(request, timeout=120):
            pass
    except urllib.error.HTTPError:
        pass  # refused (IAM auth enforced): the backend is loaded all the same
