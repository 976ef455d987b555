"""EC2 with real nodes: the fault proxy in front of moto, each instance backed by a
local sshd node (``backing``).

moto keeps the API's state and invents addresses (54.x.x.x); the proxy sees every call
on its way: the key pairs imported (``ImportKeyPair``: the fleet key each instance is
launched with), each ``RunInstances`` that succeeds (its ``KeyName`` and ``UserData``,
the cloud-config with the host key orch made), each ``TerminateInstances``.  It starts a
node per instance and stops it with the instance, and writes the node's address over
moto's invented ``ipAddress`` in every answer, so that nothing is ever sent to an
address moto made up.
"""

from __future__ import annotations

import base64
import re
import threading
from pathlib import Path

from tests.helpers.ec2_faults import FaultProxy, _params
from tests.peers.backing import Backing

_INSTANCE = re.compile(rb"<instanceId>(i-[0-9a-f]+)</instanceId>")


class BackedEC2(FaultProxy):
    """A FaultProxy whose instances are real nodes under ``root``."""

    def __init__(self, upstream_port: int, root: Path, *, port: int = 0) -> None:
        super().__init__(upstream_port, port=port)
        self.backing = Backing(root)
        self.keys: dict[str, str] = {}  # key pair name -> public key line
        self.addresses: dict[str, str] = {}  # instance id -> its node's address
        self._lock = threading.Lock()

    def stop(self) -> None:
        super().stop()
        self.backing.close()

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        params = _params(path, headers, body)
        action = params.get("Action", "")
        status, out_headers, data = super()._forward(method, path, headers, body)
        if status == 200 and action == "ImportKeyPair":
            material = base64.b64decode(params.get("PublicKeyMaterial", "")).decode().strip()
            self.keys[params["KeyName"]] = " ".join(material.split()[:2])
        elif status == 200 and action == "RunInstances":
            user_data = base64.b64decode(params["UserData"]).decode() if params.get("UserData") else None
            key = self.keys.get(params.get("KeyName", ""))
            if key is None:
                raise RuntimeError(f"RunInstances with key pair {params.get('KeyName')!r}, "
                                   "which was not imported through this proxy")
            for instance in _INSTANCE.findall(data):
                address = self.backing.start(instance.decode(), key, user_data)
                with self._lock:
                    self.addresses[instance.decode()] = address
        elif status == 200 and action == "TerminateInstances":
            for name, value in params.items():
                if name.startswith("InstanceId."):
                    self.backing.stop(value)
                    with self._lock:
                        self.addresses.pop(value, None)
        return status, out_headers, self._real_addresses(data)

    def _real_addresses(self, data: bytes) -> bytes:
        """``data`` with each backed instance's ``ipAddress`` its node's address."""
        with self._lock:
            addresses = dict(self.addresses)
        for instance, address in addresses.items():
            data = re.sub(rb"(<instanceId>" + re.escape(instance.encode()) + rb"</instanceId>(?:(?!<instanceId>).)*?"
                          rb"<ipAddress>)[^<]*(</ipAddress>)", rb"\g<1>" + address.encode() + rb"\g<2>", data,
                          flags=re.DOTALL)
        return data
