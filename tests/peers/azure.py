"""A protocol peer of Azure Resource Manager: a small stateful HTTPS server speaking the
parts of ARM's REST API (and Azure AD's token endpoint) that libcloud's stock
``AzureNodeDriver`` (``azure_arm``) calls, backed by real nodes.

libcloud's Azure connection always speaks HTTPS on port 443 of the hosts its
``cloud_environment`` names (``activeDirectoryEndpointUrl`` for the token,
``resourceManagerEndpointUrl`` for ARM), as for Azure Stack or a sovereign cloud: the
peer serves both on one loopback address of its own (``127.77.x.y``, never one of the
``127.0.0.N`` its nodes take), port 443, with a self-signed certificate for that
address that the test hands to libcloud through ``SSL_CERT_FILE``.

What it answers, as Azure does (response shapes from the recorded responses libcloud's
wheel ships under ``libcloud/test/compute/fixtures/azure_arm``):

- ``POST /{tenant}/oauth2/token``: client credentials (client id and secret) -> a
  bearer token; a wrong client or secret -> 401 ``invalid_client`` (``AADSTS7000215``).
- every ARM call checks its bearer token (401 ``InvalidAuthenticationToken``, or
  ``ExpiredAuthenticationToken`` under the fault ``expired``).
- ``GET /subscriptions/S/providers/Microsoft.Compute``: the locations of
  ``virtualMachines``; ``.../locations/L/vmSizes``: the sizes.
- network interfaces, public IP addresses and managed disks as resources of their own
  (``PUT``/``GET``/``DELETE``); a NIC's private address is its VM's backing node's.
- ``PUT .../virtualMachines/NAME``: 201 ``Creating`` with ``Azure-AsyncOperation``;
  the VM's backing node is started at once (``Backing.start`` with the key of
  ``osProfile.linuxConfiguration.ssh.publicKeys`` and the base64 ``customData`` decoded
  as its cloud-init user data), its address becomes the NIC's ``privateIPAddress``, and
  its ``InstanceView`` goes ``ProvisioningState/creating`` -> ``succeeded`` +
  ``PowerState/running`` after ``--boot-seconds``.  A VM whose NIC does not exist is
  refused (404 ``NotFound``), as is a NIC still attached at its delete (400 ``NicInUse``).
- ``DELETE .../virtualMachines/NAME``: 202 with ``Location``; ``Deleting`` for a while
  (the fault ``slow_destroy``), then gone (404) and its node stopped.
- ``GET``/``POST``/``DELETE /_orch/faults`` and ``GET /_orch/state``: the admin path the
  driver never calls (faults below; the state as JSON for tests).

Faults (``POST /_orch/faults`` with ``{"fault": NAME, "count": N, "seconds": S}``),
answered with Azure's codes in its ``{"error": {"code", "message"}}`` body:

==================  ======  ===========================================================
``capacity``        409     the next N VM creates: ``SkuNotAvailable``
``allocation``      409     the next N VM creates: ``AllocationFailed``
``quota``           409     the next N VM creates: ``OperationNotAllowed`` (cores quota)
``throttle``        429     the next N ARM calls: ``TooManyRequests`` (``Retry-After: 0``)
``expired``         401     the next N ARM calls: ``ExpiredAuthenticationToken``
                            (these two: only calls whose ``METHOD /path`` holds ``on``, if given)
``pending``         --      the next N VMs stay ``Creating`` S seconds (default: forever)
``slow_destroy``    --      the next N VM deletes stay ``Deleting`` S seconds
==================  ======  ===========================================================

Run it as ``python -m tests.peers.azure --root DIR --host 127.77.0.1 --cert C --key K
--tenant T --subscription S --client-id ID --client-secret-file F``; it prints
``ready HOST:PORT`` when it listens.  SIGTERM destroys every backing node and exits.
:func:`start_azure` starts one (a certificate made for it) and :class:`AzurePeer`
stops it by pid.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import os
import pwd
import random
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.peers.process import PeerDidNotStart, PeerProcess, serve_until_signalled, start_module

FIXTURES = Path(__import__("libcloud").__file__).parent / "test" / "compute" / "fixtures" / "azure_arm"
SUB_FIXTURE = "99999999"
LOCATIONS = ("East US", "West US 2")
"""The locations the peer offers virtual machines in (the driver's ids: eastus, westus2)."""
MORE_SIZES = (  # beside libcloud's recorded A0-A2, in the same shape: (name, cores, memory MB, resource disk MB)
    ("Standard_B1s", 1, 1024, 4096), ("Standard_B2s", 2, 4096, 8192), ("Standard_D2s_v3", 2, 8192, 16384),
    ("Standard_F4s_v2", 4, 8192, 32768))
IMAGE = "Canonical:0001-com-ubuntu-server-jammy:22_04-lts-gen2:latest"
"""The image the tests' registrations boot (a Marketplace URN: libcloud makes no call for it)."""
SIZES = ("Standard_A0", "Standard_A1", "Standard_A2", *(name for name, *_ in MORE_SIZES))
"""The sizes the peer offers."""


def _fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


@dataclass
class Fault:
    count: int
    seconds: float | None = None
    on: str | None = None  # only requests whose "METHOD /path" holds this (case-insensitive)


@dataclass
class State:
    """Everything the peer holds, by lower-cased resource path."""

    tenant: str
    subscription: str
    client_id: str
    client_secret: str
    boot_seconds: float
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    nics: dict[str, dict[str, Any]] = field(default_factory=dict)
    ips: dict[str, dict[str, Any]] = field(default_factory=dict)
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready_at: dict[str, float] = field(default_factory=dict)  # vm path -> when it runs (inf: never)
    deleting: dict[str, float] = field(default_factory=dict)  # vm path -> when it is gone
    tokens: set[str] = field(default_factory=set)
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def take(self, name: str, request: str = "") -> Fault | None:
        """One use of the fault ``name``, if armed (for ``request``, where it names one)."""
        with self.lock:
            fault = self.faults.get(name)
            if fault is None or fault.count <= 0:
                return None
            if fault.on and fault.on.lower() not in request.lower():
                return None
            fault.count -= 1
            if fault.count <= 0:
                del self.faults[name]
            return fault


_RESOURCE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/"
    r"(?P<kind>microsoft\.compute/virtualmachines|microsoft\.network/networkinterfaces|"
    r"microsoft\.network/publicipaddresses|microsoft\.compute/disks)/(?P<name>[^/]+)(?P<rest>/.*)?$")


class Peer:
    """The state machine behind the HTTP handler (one per process)."""

    def __init__(self, state: State, backing: Any) -> None:
        self.state = state
        self.backing = backing

    # -- helpers ---------------------------------------------------------------------

    def _settle(self) -> None:
        """Deletes whose time has come: the VM gone, its node stopped."""
        now = time.monotonic()
        with self.state.lock:
            done = [p for p, t in self.state.deleting.items() if t <= now]
            for path in done:
                del self.state.deleting[path]
                vm = self.state.vms.pop(path, None)
                self.state.ready_at.pop(path, None)
                if vm is not None:
                    for nic in vm["properties"]["networkProfile"]["networkInterfaces"]:
                        found = self.state.nics.get(nic["id"].lower())
                        if found is not None:
                            found["properties"].pop("virtualMachine", None)
        for path in done:
            self.backing.stop(_backing_name(path))

    def vm_view(self, path: str) -> dict[str, Any]:
        vm = json.loads(json.dumps(self.state.vms[path]))
        vm["properties"]["provisioningState"] = self._provisioning(path)
        return vm

    def _provisioning(self, path: str) -> str:
        if path in self.state.deleting:
            return "Deleting"
        return "Succeeded" if time.monotonic() >= self.state.ready_at.get(path, 0.0) else "Creating"

    def instance_view(self, path: str) -> dict[str, Any]:
        state = self._provisioning(path)
        statuses = [{"code": f"ProvisioningState/{state.lower()}", "level": "Info",
                     "displayStatus": {"Succeeded": "Provisioning succeeded"}.get(state, state)}]
        if state == "Succeeded":
            statuses.append({"code": "PowerState/running", "level": "Info", "displayStatus": "VM running"})
        elif state == "Creating":
            statuses.append({"code": "PowerState/starting", "level": "Info", "displayStatus": "VM starting"})
        return {"statuses": statuses}

    # -- requests --------------------------------------------------------------------

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        s = self.state
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type",
                         "error_description": "AADSTS70003: The app requested an unsupported grant type."}, {}
        if form.get("client_id") != s.client_id or form.get("client_secret") != s.client_secret:
            return 401, {"error": "invalid_client",
                         "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret "
                                              "being sent in the request is the client secret value, not the "
                                              "client secret ID, for a secret added to app "
                                              f"'{form.get('client_id')}'."}, {}
        body = _fixture("_77777777_7777_7777_7777_777777777777_oauth2_token.json")
        token = uuid.uuid4().hex + uuid.uuid4().hex
        now = int(time.time())
        body.update(access_token=token, expires_on=str(now + 3600), not_before=str(now),
                    resource=form.get("resource", body["resource"]))
        with s.lock:
            s.tokens.add(token)
        return 200, body, {}

    def arm(self, method: str, path: str, query: dict[str, str], body: Any,
            authorization: str) -> tuple[int, Any, dict[str, str]]:
        s = self.state
        token = authorization.removeprefix("Bearer ").strip()
        if token not in s.tokens:
            return 401, _error("InvalidAuthenticationToken", "The access token is invalid."), {}
        request = f"{method} {path}"
        if s.take("expired", request):
            return 401, _error("ExpiredAuthenticationToken",
                               "The access token expiry UTC time is earlier than current UTC time."), {}
        if s.take("throttle", request):
            return 429, _error("TooManyRequests", "The request is being throttled as the limit has been reached "
                                                  "for operation type - Read_ObservationWindow_00:05:00."), \
                {"Retry-After": "0"}
        if "api-version" not in query:
            return 400, _error("MissingApiVersionParameter",
                               "The api-version query parameter (?api-version=) is required for all requests."), {}
        self._settle()
        low = path.lower().rstrip("/")
        sub = f"/subscriptions/{s.subscription}".lower()
        if not low.startswith(sub + "/") and low != sub:
            return 404, _error("SubscriptionNotFound", f"The subscription '{path.split('/')[2]}' could not be "
                                                       "found."), {}
        if method == "GET" and low == f"{sub}/providers/microsoft.compute":
            return 200, self._compute_provider(), {}
        match = re.fullmatch(rf"{re.escape(sub)}/providers/microsoft\.compute/locations/([^/]+)/vmsizes", low)
        if method == "GET" and match:
            return self._sizes(match.group(1))
        match = re.fullmatch(rf"{re.escape(sub)}/providers/microsoft\.compute/locations/([^/]+)/operations/"
                             r"([^/]+)", low)
        if method == "GET" and match:
            return 200, {"status": "Succeeded", "name": match.group(2)}, {}
        match = re.fullmatch(rf"{re.escape(sub)}(?:/resourcegroups/([^/]+))?/providers/microsoft\.compute/"
                             r"virtualmachines", low)
        if method == "GET" and match:
            group = match.group(1)
            with s.lock:
                listed = [self.vm_view(p) for p in sorted(s.vms)
                          if group is None or p.split("/")[4] == group]
            return 200, {"value": listed}, {}
        match = _RESOURCE.match(low)
        if match is None:
            return 404, _error("InvalidResourceType", f"The resource type could not be found for '{path}'."), {}
        kind, rest = match.group("kind"), match.group("rest") or ""
        resource = low[:len(low) - len(rest)] if rest else low
        name = path.rstrip("/").split("/")[8]
        if kind == "microsoft.compute/virtualmachines":
            if rest == "/instanceview" and method == "GET":
                with s.lock:
                    if resource not in s.vms:
                        return self._not_found("Microsoft.Compute/virtualMachines", name)
                    return 200, self.instance_view(resource), {}
            if rest:
                return 404, _error("InvalidResourceType", f"not served: {path}"), {}
            return self._vm(method, resource, path, name, match.group("rg"), body)
        if rest:
            return 404, _error("InvalidResourceType", f"not served: {path}"), {}
        if kind == "microsoft.network/networkinterfaces":
            return self._nic(method, resource, path, name, body)
        if kind == "microsoft.network/publicipaddresses":
            return self._ip(method, resource, path, name, body)
        return self._disk(method, resource, name)

    def _compute_provider(self) -> dict[str, Any]:
        body = _fixture(f"_subscriptions_{SUB_FIXTURE}_providers_Microsoft_Compute.json")
        body["id"] = f"/subscriptions/{self.state.subscription}/providers/Microsoft.Compute"
        for rt in body["resourceTypes"]:
            if rt["resourceType"] == "virtualMachines":
                rt["locations"] = list(LOCATIONS)
        return body

    def _sizes(self, location: str) -> tuple[int, Any, dict[str, str]]:
        if location not in {loc.lower().replace(" ", "") for loc in LOCATIONS}:
            return 404, _error("NoRegisteredProviderFound",
                               f"No registered resource provider found for location '{location}'."), {}
        recorded = _fixture(f"_subscriptions_{SUB_FIXTURE}_providers_Microsoft_Compute_locations_eastus_vmSizes.json")
        more = [{"name": name, "numberOfCores": cores, "osDiskSizeInMB": 1047552, "resourceDiskSizeInMB": disk,
                 "memoryInMB": memory, "maxDataDiskCount": 2 * cores} for name, cores, memory, disk in MORE_SIZES]
        return 200, {"value": [v for v in recorded["value"] if v["name"] in SIZES] + more}, {}

    @staticmethod
    def _not_found(kind: str, name: str) -> tuple[int, Any, dict[str, str]]:
        return 404, _error("ResourceNotFound", f"The Resource '{kind}/{name}' under resource group was not found."), {}

    def _async_headers(self, location: str) -> dict[str, str]:
        op = f"/subscriptions/{self.state.subscription}/providers/Microsoft.Compute/locations/{location}/" \
             f"operations/{uuid.uuid4()}?api-version=2021-11-01"
        return {"Azure-AsyncOperation": op}

    def _vm(self, method: str, resource: str, path: str, name: str, group: str,
            body: Any) -> tuple[int, Any, dict[str, str]]:
        s = self.state
        if method == "GET":
            with s.lock:
                if resource not in s.vms:
                    return self._not_found("Microsoft.Compute/virtualMachines", name)
                return 200, self.vm_view(resource), {}
        if method == "DELETE":
            with s.lock:
                if resource not in s.vms:
                    return 204, None, {}
                slow = s.take("slow_destroy")
                s.deleting.setdefault(resource, time.monotonic() + ((slow.seconds or 0.0) if slow else 0.0))
            self._settle()
            return 202, None, {"Location": path + "?api-version=2021-11-01"}
        if method != "PUT":
            return 405, _error("MethodNotAllowed", f"{method} is not allowed on {path}"), {}
        return self._create_vm(resource, path, name, group, body)

    def _create_vm(self, resource: str, path: str, name: str, group: str,
                   body: Any) -> tuple[int, Any, dict[str, str]]:
        s = self.state
        if not isinstance(body, dict) or not isinstance(body.get("properties"), dict):
            return 400, _error("InvalidRequestContent", "The request content was invalid and could not be "
                                                        "deserialized."), {}
        props = body["properties"]
        location = str(body.get("location") or "")
        size = str(props.get("hardwareProfile", {}).get("vmSize") or "")
        if location not in {loc.lower().replace(" ", "") for loc in LOCATIONS}:
            return 400, _error("LocationNotAvailableForResourceType",
                               f"The provided location '{location}' is not available for resource type "
                               "'Microsoft.Compute/virtualMachines'."), {}
        if size not in SIZES:
            return 409, _error("SkuNotAvailable", f"The requested VM size {size} is not available in the current "
                                                  f"region '{location}'."), {}
        for fault, code, message in (
                ("capacity", "SkuNotAvailable",
                 f"The requested size for resource '{path}' is currently not available in location '{location}' "
                 f"zones '' for subscription '{s.subscription}'. Please try another size or deploy to a "
                 "different location or zones. See https://aka.ms/azureskunotavailable for details."),
                ("allocation", "AllocationFailed",
                 "Allocation failed. We do not have sufficient capacity for the requested VM size in this "
                 "region. Read more about improving likelihood of allocation success at "
                 "http://aka.ms/allocation-guidance"),
                ("quota", "OperationNotAllowed",
                 f"Operation could not be completed as it results in exceeding approved Total Regional Cores "
                 f"quota. Additional details - Deployment Model: Resource Manager, Location: {location}, "
                 "Current Limit: 4, Current Usage: 4, Additional Required: 1, (Minimum) New Limit Required: 5.")):
            if s.take(fault):
                return 409, _error(code, message), {}
        os_profile = props.get("osProfile") or {}
        keys = (((os_profile.get("linuxConfiguration") or {}).get("ssh") or {}).get("publicKeys") or [])
        if not keys or not keys[0].get("keyData"):
            return 400, _error("InvalidParameter", "Required parameter 'osProfile.linuxConfiguration.ssh"
                                                   ".publicKeys' is missing (null)."), {}
        try:
            user_data = base64.b64decode(os_profile["customData"]).decode() if os_profile.get("customData") \
                else None
        except (ValueError, UnicodeDecodeError):
            return 400, _error("InvalidParameter", "The value of parameter customData is invalid."), {}
        nics = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        if not nics:
            return 400, _error("InvalidParameter", "Required parameter 'networkProfile' is missing (null)."), {}
        with s.lock:
            if resource in s.vms:
                return 409, _error("OperationNotAllowed", f"Virtual machine '{name}' already exists; the peer "
                                                          "does not update virtual machines."), {}
            nic = s.nics.get(str(nics[0].get("id", "")).lower())
            if nic is None:
                return 404, _error("NotFound", f"Resource {nics[0].get('id')} not found."), {}
        address = self.backing.start(_backing_name(resource), str(keys[0]["keyData"]), user_data)
        pending = s.take("pending")
        vm = json.loads(json.dumps(body))
        vm.update(id=path, name=name, type="Microsoft.Compute/virtualMachines", location=location,
                  tags=body.get("tags") or {})
        vm_props = vm["properties"]
        vm_props["vmId"] = str(uuid.uuid4())
        vm_props["osProfile"].pop("customData", None)  # Azure never returns customData
        vm_props["osProfile"].pop("adminPassword", None)  # nor the password
        os_disk = vm_props.get("storageProfile", {}).get("osDisk", {})
        if "managedDisk" in os_disk:
            disk_id = f"/subscriptions/{s.subscription}/resourceGroups/{group}/providers/Microsoft.Compute/" \
                      f"disks/{os_disk.get('name') or name}"
            os_disk["managedDisk"]["id"] = disk_id
            with s.lock:
                s.disks[disk_id.lower()] = {"id": disk_id, "name": os_disk.get("name") or name,
                                            "location": location, "managedBy": path}
        with s.lock:
            s.vms[resource] = vm
            s.ready_at[resource] = time.monotonic() + (
                (pending.seconds if pending.seconds is not None else float("inf")) if pending else s.boot_seconds)
            nic["properties"]["virtualMachine"] = {"id": path}
            nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"] = address
            view = self.vm_view(resource)
        return 201, view, self._async_headers(location)

    def _nic(self, method: str, resource: str, path: str, name: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        s = self.state
        with s.lock:
            nic = s.nics.get(resource)
            if method == "GET":
                return (200, nic, {}) if nic is not None else \
                    self._not_found("Microsoft.Network/networkInterfaces", name)
            if method == "DELETE":
                if nic is None:
                    return 204, None, {}
                attached = nic["properties"].get("virtualMachine")
                if attached:
                    return 400, _error("NicInUse", f"Network Interface {path} is used by existing resource "
                                                   f"{attached['id']}. In order to delete the network interface, "
                                                   "it must be dissociated from the resource."), {}
                del s.nics[resource]
                return 200, None, {}
            if method != "PUT" or not isinstance(body, dict):
                return 405, _error("MethodNotAllowed", f"{method} is not allowed on {path}"), {}
            configs = (body.get("properties") or {}).get("ipConfigurations") or []
            if not configs:
                return 400, _error("InvalidRequestFormat", "Network interface must have an ipConfiguration."), {}
            ip_configs = []
            for config in configs:
                props = dict(config.get("properties") or {})
                props.setdefault("privateIPAllocationMethod", "Dynamic")
                props["provisioningState"] = "Succeeded"
                public = props.get("publicIPAddress")
                if public and str(public.get("id", "")).lower() not in s.ips:
                    return 400, _error("InvalidResourceReference",
                                       f"Resource {public.get('id')} referenced by resource {path} was not "
                                       "found."), {}
                ip_configs.append({"name": config.get("name", "ipconfig1"),
                                   "id": f"{path}/ipConfigurations/{config.get('name', 'ipconfig1')}",
                                   "properties": props})
            created = nic is None
            made = _fixture(f"_subscriptions_{SUB_FIXTURE}_resourceGroups_000000_providers_Microsoft_Network_"
                            "networkInterfaces_test_node_1_nic.json")
            made.update(id=path, name=name, location=body.get("location", ""), tags=body.get("tags") or {})
            made["properties"]["ipConfigurations"] = ip_configs
            made["properties"].pop("virtualMachine", None)
            if nic is not None and nic["properties"].get("virtualMachine"):
                made["properties"]["virtualMachine"] = nic["properties"]["virtualMachine"]
                old = nic["properties"]["ipConfigurations"][0]["properties"].get("privateIPAddress")
                if old:
                    ip_configs[0]["properties"]["privateIPAddress"] = old
            s.nics[resource] = made
            return (201 if created else 200), made, {}

    def _ip(self, method: str, resource: str, path: str, name: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        s = self.state
        with s.lock:
            ip = s.ips.get(resource)
            if method == "GET":
                if ip is None:
                    return self._not_found("Microsoft.Network/publicIPAddresses", name)
                view = json.loads(json.dumps(ip))
                address = self._public_address(resource)
                if address:
                    view["properties"]["ipAddress"] = address
                return 200, view, {}
            if method == "DELETE":
                if ip is None:
                    return 204, None, {}
                del s.ips[resource]
                return 200, None, {}
            if method != "PUT" or not isinstance(body, dict):
                return 405, _error("MethodNotAllowed", f"{method} is not allowed on {path}"), {}
            made = {"id": path, "name": name, "location": body.get("location", ""), "tags": body.get("tags") or {},
                    "type": "Microsoft.Network/publicIPAddresses",
                    "properties": {"provisioningState": "Succeeded", "publicIPAddressVersion": "IPv4",
                                   "publicIPAllocationMethod": (body.get("properties") or {}).get(
                                       "publicIPAllocationMethod", "Dynamic"), "idleTimeoutInMinutes": 4}}
            s.ips[resource] = made
            return (201 if ip is None else 200), made, {}

    def _public_address(self, ip_resource: str) -> str | None:
        """A public IP's address: its NIC's VM's node (a dynamic address exists while
        the VM it serves runs)."""
        for nic in self.state.nics.values():
            for config in nic["properties"]["ipConfigurations"]:
                public = config["properties"].get("publicIPAddress")
                if public and str(public.get("id", "")).lower() == ip_resource:
                    return str(config["properties"].get("privateIPAddress") or "") or None
        return None

    def _disk(self, method: str, resource: str, name: str) -> tuple[int, Any, dict[str, str]]:
        s = self.state
        with s.lock:
            disk = s.disks.get(resource)
            if method == "GET":
                return (200, disk, {}) if disk else self._not_found("Microsoft.Compute/disks", name)
            if method == "DELETE":
                if disk is None:
                    return 204, None, {}
                if disk.get("managedBy") and disk["managedBy"].lower() in s.vms:
                    return 409, _error("OperationNotAllowed", f"Disk {name} is attached to VM "
                                                              f"{disk['managedBy']}."), {}
                del s.disks[resource]
                return 202, None, {}
            return 405, _error("MethodNotAllowed", f"{method} is not allowed on disks here"), {}

    def admin(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        s = self.state
        self._settle()
        with s.lock:
            if path == "/_orch/faults" and method == "POST":
                s.faults[str(body["fault"])] = Fault(int(body.get("count", 1)), body.get("seconds"), body.get("on"))
                return 200, {"faults": sorted(s.faults)}, {}
            if path == "/_orch/faults" and method == "DELETE":
                s.faults.clear()
                return 200, {"faults": []}, {}
            if path == "/_orch/faults":
                return 200, {k: vars(v) for k, v in s.faults.items()}, {}
            if path == "/_orch/state":
                return 200, {"vms": [self.vm_view(p) for p in sorted(s.vms)],
                             "nics": [s.nics[p] for p in sorted(s.nics)],
                             "public_ips": [s.ips[p] for p in sorted(s.ips)],
                             "disks": [s.disks[p] for p in sorted(s.disks)],
                             "nodes": {_backing_name(p): self.backing.address(_backing_name(p)) for p in s.vms},
                             "requests": list(s.requests)}, {}
        return 404, _error("NotFound", path), {}


def _backing_name(resource: str) -> str:
    """The backing node of a VM: its resource group and name (safe as a folder name)."""
    parts = resource.split("/")
    return re.sub(r"[^a-z0-9-]", "-", f"{parts[4]}-{parts[8]}".lower())


def make_handler(peer: Peer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any, headers: dict[str, str]) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            split = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(split.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with peer.state.lock:
                peer.state.requests.append(f"{self.command} {split.path}")
            try:
                if split.path.startswith("/_orch/"):
                    answer = peer.admin(self.command, split.path, json.loads(raw or b"{}"))
                elif re.fullmatch(r"/[^/]+/oauth2/token", split.path) and self.command == "POST":
                    tenant = split.path.split("/")[1]
                    if tenant != peer.state.tenant:
                        answer = (400, {"error": "invalid_request",
                                        "error_description": f"AADSTS90002: Tenant '{tenant}' not found."}, {})
                    else:
                        answer = peer.token(dict(urllib.parse.parse_qsl(raw.decode())))
                else:
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        answer = (400, _error("InvalidRequestContent", "The request content was invalid."), {})
                    else:
                        answer = peer.arm(self.command, split.path, query, body,
                                          self.headers.get("Authorization") or "")
            except Exception as exc:  # the peer's own bug: say so as Azure would, and keep serving
                answer = (500, _error("InternalServerError", f"{type(exc).__name__}: {exc}"), {})
            self._answer(*answer)

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle

    return Handler


def serve(args: argparse.Namespace) -> None:
    from tests.peers.backing import Backing

    state = State(tenant=args.tenant, subscription=args.subscription, client_id=args.client_id,
                  client_secret=Path(args.client_secret_file).read_text().strip(), boot_seconds=args.boot_seconds)
    backing = Backing(Path(args.root))
    peer = Peer(state, backing)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(peer))
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    serve_until_signalled(server, backing.close, f"ready {args.host}:{server.server_address[1]}", poll_interval=0.2)


# -- starting and stopping one, for tests -------------------------------------------------------


@dataclass
class AzurePeer(PeerProcess):
    """A running peer: its process, the address it serves (port 443), its account."""

    process: subprocess.Popen[str]
    host: str
    root: Path
    ca_file: Path
    tenant: str
    subscription: str
    client_id: str
    secret_file: Path

    @property
    def base(self) -> str:
        return f"https://{self.host}"

    admin_url = base

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def cloud_environment(self) -> dict[str, str]:
        """The driver's ``cloud_environment`` for this peer (as for Azure Stack)."""
        return {"resourceManagerEndpointUrl": f"{self.base}/", "activeDirectoryEndpointUrl": self.base,
                "activeDirectoryResourceId": f"{self.base}/", "storageEndpointSuffix": ".core.windows.net"}

    def registration(self, client_id_env: str, *, ssh_user: str | None = None) -> dict[str, Any]:
        """``providers/NAME.yaml`` (as JSON) for this peer: docs/clouds/azure.md's
        registration plus ``cloud_environment``; the client id read from the environment
        variable ``client_id_env``, the secret from the peer's 0600 file; the login user
        the backing nodes take (this process's user)."""
        return {"driver": "azure_arm", "image": IMAGE, "ssh_user": ssh_user or pwd.getpwuid(os.geteuid()).pw_name,
                "options": {"tenant_id": self.tenant, "subscription_id": self.subscription, "region": "eastus",
                            "ex_resource_group": "orch", "ex_network": "orch-vnet", "ex_subnet": "default",
                            "ex_use_managed_disks": True, "cloud_environment": self.cloud_environment()},
                "credentials": {"key": f"env:{client_id_env}", "secret": f"file:{self.secret_file}"}}

    def leftovers(self, vm_name: str) -> list[str]:
        """What of the VM ``vm_name`` (of resource group ``orch``) is still here: the VM
        (not deleting), its NIC, its disk, its node's folder."""
        state = self.state()
        found = [f"VM {vm['id']} ({vm['properties']['provisioningState']})" for vm in state["vms"]
                 if vm["name"] == vm_name and vm["properties"]["provisioningState"] != "Deleting"]
        found += [f"NIC {nic['id']}" for nic in state["nics"] if nic["name"] == f"{vm_name}-nic"]
        found += [f"disk {disk['id']}" for disk in state["disks"] if disk["name"] == vm_name]
        folder = self.root / _backing_name(f"/subscriptions/{self.subscription}/resourceGroups/orch/providers/"
                                           f"Microsoft.Compute/virtualMachines/{vm_name}")
        return found + ([f"the node's folder {folder}"] if folder.exists() else [])

    def fault(self, name: str, count: int = 1, seconds: float | None = None, on: str | None = None) -> None:
        """Arm a fault for the next ``count`` requests (those naming ``on``, if given)."""
        self._call("POST", "/_orch/faults", {"fault": name, "count": count, "seconds": seconds, "on": on})


def make_certificate(folder: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (an IP address): (cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "peer-cert.pem", folder / "peer-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def unavailable() -> str | None:
    """Why no peer can run here, or None: it serves port 443 (libcloud's Azure connection
    takes no port) and its nodes port 22, which only root may bind."""
    return None if os.geteuid() == 0 else "needs root: the Azure peer serves HTTPS on port 443, its nodes sshd on 22"


def _free_https_address() -> str:
    """A loopback address (127.77.x.y) whose port 443 is free a moment ago."""
    for _ in range(50):
        host = f"127.77.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with socket.socket() as sock:
            try:
                sock.bind((host, 443))
            except OSError:
                continue
            return host
    raise RuntimeError("no loopback address with a free port 443 in 127.77.0.0/16")


def start_azure(folder: Path, *, tenant: str = "72f988bf-86f1-41af-91ab-2d7cd011db47",
                subscription: str = "0b1f6471-1bf0-4dda-aec3-cb9272f09590",
                client_id: str = "5e4a3b2c-1d0e-4f9a-8b7c-6d5e4f3a2b1c",
                boot_seconds: float = 0.3, timeout: float = 30.0) -> AzurePeer:
    """Start a peer serving under ``folder`` (its nodes, certificate and the client
    secret as a 0600 file); returns once it listens."""
    folder.mkdir(parents=True, exist_ok=True)
    secret_file = folder / "client-secret"
    secret_file.write_text(f"orch~{uuid.uuid4().hex}\n")
    secret_file.chmod(0o600)
    for _ in range(5):
        host = _free_https_address()
        cert, key = make_certificate(folder, host)
        try:
            process, _ = start_module("tests.peers.azure", [
                "--root", str(folder / "nodes"), "--host", host, "--port", "443", "--cert", str(cert), "--key",
                str(key), "--tenant", tenant, "--subscription", subscription, "--client-id", client_id,
                "--client-secret-file", str(secret_file), "--boot-seconds", str(boot_seconds)],
                folder / "peer.log", ready="ready ", what="Azure", timeout=timeout)
        except PeerDidNotStart as failed:
            if "Address already in use" not in failed.log:
                raise
            continue
        return AzurePeer(process, host, folder / "nodes", cert, tenant, subscription, client_id, secret_file)
    raise RuntimeError("the Azure peer found no free address")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.azure", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder of the backing nodes")
    parser.add_argument("--host", default="127.77.0.1")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--subscription", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret-file", required=True)
    parser.add_argument("--boot-seconds", type=float, default=0.3)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
