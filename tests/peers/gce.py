"""A small stateful Google Compute Engine: Google's OAuth 2.0 token endpoint (a service
account's signed JWT exchanged for a bearer token) and the Compute Engine v1 API of one
project on 127.0.0.1, enough for libcloud's stock ``gce`` driver, with real nodes
behind its instances.

How the stock driver reaches it: libcloud's ``GCENodeDriver`` cannot take ``host`` or
``port`` (``BaseDriver`` hands them to ``GCEConnection`` positionally, where they land
on ``auth_type``), and its token endpoint is ``accounts.google.com``, so the peer is
an HTTP proxy: the driver's own ``proxy_url`` and ``secure=False`` options send every
request, the token exchange included, as ``GET http://www.googleapis.com/...`` to
127.0.0.1:PORT.  Nothing is resolved or sent anywhere else (plain HTTP through a
proxy names the host in the request line only).

Answers are shaped from the recorded responses libcloud's wheel ships
(``libcloud/test/compute/fixtures/gce/``: ``zones.json``,
``aggregated_machineTypes.json``, ``zones_us-central1-a_instances_node-name.json``,
``operations_operation_zones_us-central1-a_instances_post.json``,
``global_networks_default.json``, ``zones_us-central1-a_diskTypes_pd_standard.json``,
``zones_us-central1-a_disks_lcdisk.json``, ``global_images.json``), the project name
and zones rewritten.

What it serves:

- ``POST /o/oauth2/token``: the JWT bearer grant.  The assertion's RS256 signature is
  checked against the service account's public key (``--public-key``), its ``iss``
  against ``--account``, its ``aud`` and ``exp``; a bad one gets Google's
  ``400 {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}``.
  Tokens live ``--token-ttl`` seconds; an API call without a live one gets GCE's 401
  (reason ``authError``).
- ``/compute/v1/projects/PROJECT``: ``zones``, ``zones/Z``, ``regions``,
  ``aggregated/machineTypes``, ``zones/Z/machineTypes[/T]``, ``global/networks/default``,
  ``zones/Z/diskTypes/T``, ``aggregated/instances``, ``zones/Z/instances`` (list,
  insert, get, delete), ``aggregated/disks``, ``zones/Z/disks/D``, ``global/images``
  and ``zones/Z/operations/OP``; images of the public image project ``debian-cloud``
  at ``/compute/v1/projects/debian-cloud/global/images[/NAME]``.  An insert checks the
  machine type is of the instance's zone, the image exists, the name and labels follow
  GCE's rules; it answers a zonal operation (``RUNNING``) that is ``DONE`` once the
  instance's node is up.  A delete answers an operation too; the instance and its boot
  disk go.
- Each instance is a real node (:class:`tests.peers.backing.Backing`): a local sshd on
  127.0.0.N:22 accepting the key of the ``ssh-keys`` metadata item (``USER:KEY``) and
  offering the host key of the ``user-data`` item's ``#cloud-config``; that address is
  the instance's ``natIP``.

Faults, through ``POST /_orch/faults`` (JSON; the driver never calls ``/_orch``), as
GCE answers them:

- ``capacity``: zones (or ``["*"]``) whose inserts end in an operation error
  ``ZONE_RESOURCE_POOL_EXHAUSTED``;
- ``quota_instances``: an insert beyond that many instances ends in an operation error
  ``QUOTA_EXCEEDED`` (``Quota 'INSTANCES' exceeded``);
- ``throttle``: the next N inserts are refused ``429`` (reason ``rateLimitExceeded``);
- ``revoke_tokens``: every token issued so far is dead (401 ``authError``);
- ``pending``: the next N instances stay ``STAGING`` for good (no node);
- ``slow_destroy``: a delete's operation stays ``RUNNING`` that many seconds.

``GET /_orch/state`` returns the instances (labels, metadata, address, status), the
number of tokens issued and the calls; ``DELETE /_orch/faults`` clears the faults.

Run it with ``python -m tests.peers.gce --port P --root DIR --project P --account EMAIL
--public-key PEM``: it prints ``listening on PORT`` when ready, and on SIGTERM stops
every node.  From a test, use :func:`start_peer` and :meth:`GCEPeer.stop` (by pid).
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.peers.backing import Backing
from tests.peers.process import PeerHandler, PeerProcess, serve_until_signalled, start_module

API = "https://www.googleapis.com/compute/v1"
TOKEN_AUDIENCE = "https://accounts.google.com/o/oauth2/token"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ZONES = ("us-central1-a", "us-central1-b", "europe-west1-b")
MACHINE_TYPES = ("f1-micro", "g1-small", "n1-standard-1", "n1-standard-2", "n1-highcpu-2")
IMAGE_PROJECT = "debian-cloud"
IMAGE = "debian-12-bookworm-v20240110"
IMAGE_FAMILY = "debian-12"
NAME_RULE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")


def fixture(name: str) -> Any:
    """A recorded response of libcloud's GCE tests."""
    import libcloud

    folder = Path(libcloud.__file__).parent / "test/compute/fixtures/gce"
    return json.loads((folder / name).read_text())


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def google_error(status: int, reason: str, message: str, *, state: str, domain: str = "global",
                 **more: str) -> dict[str, Any]:
    """An error body as Google's APIs answer one."""
    return {"error": {"code": status, "message": message,
                      "errors": [{"message": message, "domain": domain, "reason": reason, **more}],
                      "status": state}}


def unauthenticated() -> dict[str, Any]:
    return google_error(401, "authError", "Request had invalid authentication credentials. Expected OAuth 2 "
                        "access token, login cookie or other valid authentication credential.",
                        state="UNAUTHENTICATED", location="Authorization", locationType="header")


def not_found(what: str) -> tuple[int, Any]:
    return 404, google_error(404, "notFound", f"The resource '{what}' was not found", state="NOT_FOUND")


def invalid(message: str) -> tuple[int, Any]:
    return 400, google_error(400, "invalid", message, state="INVALID_ARGUMENT")


@dataclass
class Instance:
    id: str
    name: str
    zone: str
    machine_type: str
    labels: dict[str, str]
    metadata: list[dict[str, str]]
    status: str = "PROVISIONING"
    address: str | None = None
    created: str = field(default_factory=_now)


@dataclass
class Faults:
    capacity: list[str] = field(default_factory=list)
    quota_instances: int | None = None
    throttle: int = 0
    pending: int = 0
    slow_destroy: float = 0.0


class Cloud:
    """The project's state; every method is called under ``lock`` or takes it."""

    def __init__(self, root: Path, project: str, account: str, public_key: rsa.RSAPublicKey,
                 token_ttl: int) -> None:
        self.project = project
        self.account = account
        self.public_key = public_key
        self.token_ttl = token_ttl
        self.backing = Backing(root)
        self.lock = threading.RLock()
        self.tokens: dict[str, float] = {}
        self.tokens_issued = 0
        self.instances: dict[tuple[str, str], Instance] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.faults = Faults()
        self.calls: list[str] = []
        self.machine_types = self._machine_types()

    # -- links ---------------------------------------------------------------------

    def link(self, path: str) -> str:
        return f"{API}/projects/{self.project}/{path}"

    def _rewrite(self, data: Any) -> Any:
        return json.loads(json.dumps(data).replace("projects/project_name/", f"projects/{self.project}/")
                          .replace("https://content.googleapis.com/", "https://www.googleapis.com/"))

    # -- auth ----------------------------------------------------------------------

    def token(self, form: dict[str, str]) -> tuple[int, Any]:
        def refused(description: str) -> tuple[int, Any]:
            return 400, {"error": "invalid_grant", "error_description": description}

        if form.get("grant_type") != JWT_GRANT:
            return 400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}
        parts = str(form.get("assertion", "")).split(".")
        if len(parts) != 3:
            return refused("Invalid JWT: the assertion is not a JWT.")
        try:
            header = json.loads(_b64decode(parts[0]))
            claims = json.loads(_b64decode(parts[1]))
            signature = _b64decode(parts[2])
        except ValueError:
            return refused("Invalid JWT: the assertion is malformed.")
        if header.get("alg") != "RS256":
            return refused("Invalid JWT: the algorithm must be RS256.")
        try:
            self.public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return refused("Invalid JWT Signature.")
        now = time.time()
        if claims.get("iss") != self.account:
            return refused("Invalid grant: account not found")
        if claims.get("aud") != TOKEN_AUDIENCE:
            return refused("Invalid JWT: Failed audience check.")
        if not (int(claims.get("iat", 0)) - 300 <= now <= int(claims.get("exp", 0)) + 300):
            return refused("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                           "timeframe. Check your iat and exp values in the JWT claim.")
        token = "ya29.orch-" + secrets.token_urlsafe(24)
        with self.lock:
            self.tokens[token] = now + self.token_ttl
            self.tokens_issued += 1
        return 200, {"access_token": token, "expires_in": self.token_ttl, "token_type": "Bearer"}

    def authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        with self.lock:
            return scheme == "Bearer" and self.tokens.get(token, 0.0) > time.time()

    # -- catalogue -----------------------------------------------------------------

    def _machine_types(self) -> dict[str, dict[str, dict[str, Any]]]:
        recorded = fixture("aggregated_machineTypes.json")["items"]["zones/us-central1-a"]["machineTypes"]
        by_name = {m["name"]: m for m in recorded if m["name"] in MACHINE_TYPES}
        types: dict[str, dict[str, dict[str, Any]]] = {}
        for zone in ZONES:
            types[zone] = {}
            for name, recorded_type in by_name.items():
                made = dict(recorded_type, zone=zone, selfLink=self.link(f"zones/{zone}/machineTypes/{name}"))
                types[zone][name] = made
        return types

    def zones(self) -> list[dict[str, Any]]:
        recorded = {z["name"]: z for z in fixture("zones.json")["items"]}
        template = recorded["us-central1-a"]
        made = []
        for number, zone in enumerate(ZONES):
            region = zone.rsplit("-", 1)[0]
            made.append({**template, "id": str(2000 + number), "name": zone, "description": zone,
                         "selfLink": self.link(f"zones/{zone}"), "region": self.link(f"regions/{region}"),
                         "status": "UP"})
        return made

    def regions(self) -> list[dict[str, Any]]:
        names = sorted({z.rsplit("-", 1)[0] for z in ZONES})
        return [{"kind": "compute#region", "id": str(1000 + i), "name": name, "status": "UP",
                 "selfLink": self.link(f"regions/{name}"), "description": name,
                 "zones": [self.link(f"zones/{z}") for z in ZONES if z.startswith(name)], "quotas": []}
                for i, name in enumerate(names)]

    def image(self) -> dict[str, Any]:
        recorded = fixture("global_images.json")["items"][0]
        return {**{k: v for k, v in recorded.items() if not k.startswith("get")},
                "id": "1514128291730411111", "name": IMAGE, "family": IMAGE_FAMILY, "labels": {},
                "description": "Debian, Debian GNU/Linux, 12 (bookworm), amd64 built on 20240110",
                "architecture": "X86_64", "sourceDisk": None, "sourceDiskId": None,
                "selfLink": f"{API}/projects/{IMAGE_PROJECT}/global/images/{IMAGE}"}

    def network(self) -> dict[str, Any]:
        return self._rewrite(fixture("global_networks_default.json"))

    def disk_type(self, zone: str, name: str) -> dict[str, Any]:
        recorded = self._rewrite(fixture("zones_us-central1-a_diskTypes_pd_standard.json"))
        return {**recorded, "name": name, "zone": self.link(f"zones/{zone}"),
                "selfLink": self.link(f"zones/{zone}/diskTypes/{name}")}

    # -- instances -----------------------------------------------------------------

    def instance_json(self, instance: Instance) -> dict[str, Any]:
        made = self._rewrite(fixture("zones_us-central1-a_instances_node-name.json"))
        nat = [{"kind": "compute#accessConfig", "name": "External NAT", "natIP": instance.address,
                "type": "ONE_TO_ONE_NAT"}] if instance.address else []
        made.update({
            "id": instance.id, "name": instance.name, "status": instance.status,
            "creationTimestamp": instance.created,
            "zone": self.link(f"zones/{instance.zone}"),
            "machineType": self.link(f"zones/{instance.zone}/machineTypes/{instance.machine_type}"),
            "selfLink": self.link(f"zones/{instance.zone}/instances/{instance.name}"),
            "labels": dict(instance.labels), "labelFingerprint": "42WmSpB8rSM=",
            "metadata": {"fingerprint": "42WmSpB8rSM=", "kind": "compute#metadata",
                         "items": [dict(i) for i in instance.metadata]},
        })
        made["disks"][0].update({"source": self.link(f"zones/{instance.zone}/disks/{instance.name}"),
                                 "deviceName": instance.name, "autoDelete": True})
        made["networkInterfaces"][0].update({"networkIP": f"10.128.0.{2 + int(instance.id) % 250}",
                                             "accessConfigs": nat})
        return made

    def disk_json(self, instance: Instance) -> dict[str, Any]:
        made = self._rewrite(fixture("zones_us-central1-a_disks_lcdisk.json"))
        made.update({"id": str(int(instance.id) + 1), "name": instance.name, "description": "",
                     "zone": self.link(f"zones/{instance.zone}"),
                     "type": self.link(f"zones/{instance.zone}/diskTypes/pd-standard"),
                     "selfLink": self.link(f"zones/{instance.zone}/disks/{instance.name}"),
                     "sourceImage": self.image()["selfLink"], "sourceImageId": self.image()["id"],
                     "users": [self.link(f"zones/{instance.zone}/instances/{instance.name}")]})
        return made

    def operation(self, zone: str, kind: str, instance: Instance, *, status: str = "RUNNING",
                  error: dict[str, Any] | None = None) -> dict[str, Any]:
        recorded = self._rewrite(fixture("operations_operation_zones_us-central1-a_instances_post.json"))
        name = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
        op = {**recorded, "id": str(secrets.randbits(63)), "name": name, "operationType": kind,
              "status": status, "progress": 100 if status == "DONE" else 0, "insertTime": _now(),
              "startTime": _now(), "targetId": instance.id, "zone": self.link(f"zones/{zone}"),
              "targetLink": self.link(f"zones/{zone}/instances/{instance.name}"),
              "selfLink": self.link(f"zones/{zone}/operations/{name}"), "user": self.account}
        op.pop("endTime", None)
        if error is not None:
            op.update({"error": error, "status": "DONE", "progress": 100, "endTime": _now(),
                       "httpErrorStatusCode": 403 if error["errors"][0]["code"] == "QUOTA_EXCEEDED" else 503,
                       "httpErrorMessage": "FORBIDDEN" if error["errors"][0]["code"] == "QUOTA_EXCEEDED"
                       else "SERVICE UNAVAILABLE"})
        with self.lock:
            self.operations[name] = op
        return op

    def finish(self, op: dict[str, Any]) -> None:
        with self.lock:
            op.update({"status": "DONE", "progress": 100, "endTime": _now()})

    def insert(self, zone: str, body: dict[str, Any]) -> tuple[int, Any]:
        name = str(body.get("name") or "")
        if not NAME_RULE.fullmatch(name):
            return invalid(f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                           "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
        machine = str(body.get("machineType") or "")
        if machine.rpartition("/")[2] not in self.machine_types[zone] or \
                (machine.startswith("https://") and f"/zones/{zone}/" not in machine):
            return invalid(f"Invalid value for field 'resource.machineType': '{machine}'. "
                           f"Machine type with name '{machine.rpartition('/')[2]}' does not exist in zone '{zone}'.")
        disks = body.get("disks") or []
        source = str(((disks[0] if disks else {}).get("initializeParams") or {}).get("sourceImage") or "")
        if source.rpartition("/")[2] != IMAGE:
            return invalid(f"Invalid value for field 'resource.disks[0].initializeParams.sourceImage': '{source}'. "
                           "The referenced image resource cannot be found.")
        labels = body.get("labels") or {}
        for key, value in labels.items():
            if not LABEL_KEY.fullmatch(str(key)) or not LABEL_VALUE.fullmatch(str(value)):
                return invalid(f"Invalid value for field 'resource.labels': '{key}={value}'. Label keys and values "
                               "can only contain lowercase letters, numeric characters, underscores and dashes.")
        metadata = (body.get("metadata") or {}).get("items") or []
        if not all(isinstance(i, dict) and set(i) == {"key", "value"} for i in metadata):
            return invalid("Invalid value for field 'resource.metadata': items must be {key, value}.")
        with self.lock:
            if self.faults.throttle > 0:
                self.faults.throttle -= 1
                return 429, google_error(429, "rateLimitExceeded", "Rate Limit Exceeded", domain="usageLimits",
                                         state="RESOURCE_EXHAUSTED")
            if (zone, name) in self.instances:
                link = self.link(f"zones/{zone}/instances/{name}")
                return 409, google_error(409, "alreadyExists", f"The resource '{link}' already exists",
                                         state="ALREADY_EXISTS")
            instance = Instance(str(secrets.randbits(62)), name, zone, machine.rpartition("/")[2],
                                {str(k): str(v) for k, v in labels.items()}, [dict(i) for i in metadata])
            if zone in self.faults.capacity or "*" in self.faults.capacity:
                error = {"errors": [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                                     "message": f"The zone 'projects/{self.project}/zones/{zone}' does not have "
                                                "enough resources available to fulfill the request.  Try a "
                                                "different zone, or try again later."}]}
                return 200, self.operation(zone, "insert", instance, error=error)
            limit = self.faults.quota_instances
            if limit is not None and len(self.instances) >= limit:
                region = zone.rsplit("-", 1)[0]
                error = {"errors": [{"code": "QUOTA_EXCEEDED",
                                     "message": f"Quota 'INSTANCES' exceeded.  Limit: {float(limit)} in region "
                                                f"{region}."}]}
                return 200, self.operation(zone, "insert", instance, error=error)
            pending = self.faults.pending > 0
            if pending:
                self.faults.pending -= 1
            self.instances[(zone, name)] = instance
            op = self.operation(zone, "insert", instance)
            answer = copy.deepcopy(op)
        items = {i["key"]: i["value"] for i in metadata}
        user, _, key = str(items.get("ssh-keys", "")).partition(":")
        threading.Thread(target=self._boot, args=(instance, op, key.strip() if user else "", items.get("user-data"),
                                                  pending), daemon=True).start()
        return 200, answer

    def _boot(self, instance: Instance, op: dict[str, Any], public_key: str, user_data: str | None,
              pending: bool) -> None:
        with self.lock:
            instance.status = "STAGING"
        if pending:
            self.finish(op)
            return
        try:
            address = self.backing.start(instance.name, public_key, user_data) if public_key else None
        except Exception as exc:  # the node did not come up: the instance fails as GCE's would
            sys.stderr.write(f"node {instance.name} failed: {exc}\n")
            with self.lock:
                instance.status = "TERMINATED"
            self.finish(op)
            return
        with self.lock:
            gone = self.instances.get((instance.zone, instance.name)) is not instance
            instance.address, instance.status = address, "RUNNING"
        if gone:  # deleted meanwhile
            self.backing.stop(instance.name)
        self.finish(op)

    def delete(self, zone: str, name: str) -> tuple[int, Any]:
        with self.lock:
            instance = self.instances.get((zone, name))
            if instance is None:
                return not_found(f"projects/{self.project}/zones/{zone}/instances/{name}")
            instance.status = "STOPPING"
            op = self.operation(zone, "delete", instance)
            answer = copy.deepcopy(op)
            delay = self.faults.slow_destroy

        def remove() -> None:
            if delay:
                time.sleep(delay)
            self.backing.stop(instance.name)
            with self.lock:
                if self.instances.get((zone, name)) is instance:
                    del self.instances[(zone, name)]
            self.finish(op)

        if delay:
            threading.Thread(target=remove, daemon=True).start()
        else:
            remove()
        return 200, answer

    def listed(self, zone: str | None = None) -> list[Instance]:
        with self.lock:
            return [i for (z, _), i in sorted(self.instances.items()) if zone is None or z == zone]

    def aggregated(self, kind: str, items: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        scoped: dict[str, Any] = {}
        for zone in ZONES:
            found = items.get(zone) or []
            scoped[f"zones/{zone}"] = {kind: found} if found else {
                "warning": {"code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope "
                            f"'zones/{zone}' on this page.", "data": [{"key": "scope", "value": f"zones/{zone}"}]}}
        return {"kind": f"compute#{kind[:-1]}AggregatedList", "id": f"projects/{self.project}/aggregated/{kind}",
                "items": scoped, "selfLink": self.link(f"aggregated/{kind}")}

    # -- admin ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "instances": [{"id": i.id, "name": i.name, "zone": i.zone, "machineType": i.machine_type,
                               "labels": i.labels, "metadata": {m["key"]: m["value"] for m in i.metadata},
                               "status": i.status, "address": i.address} for i in self.instances.values()],
                "backing": sorted(str(n.name) for n in self.backing.driver.list_nodes()),
                "backing_nodes": {str(n.name): {"id": str(n.id), "dir": str((n.extra or {}).get("node_dir"))}
                                  for n in self.backing.driver.list_nodes()},
                "tokens_issued": self.tokens_issued,
                "calls": list(self.calls),
                "faults": dict(self.faults.__dict__),
            }

    def set_faults(self, body: dict[str, Any]) -> tuple[int, Any]:
        with self.lock:
            for key, value in body.items():
                if key == "revoke_tokens":
                    if value:
                        self.tokens.clear()
                    continue
                if not hasattr(self.faults, key):
                    return 400, {"error": f"no fault {key!r}"}
                setattr(self.faults, key, value)
            return 200, dict(self.faults.__dict__)

    def close(self) -> None:
        self.backing.close()


class Handler(PeerHandler):
    cloud: Cloud
    log_requests = True

    def _serve(self) -> None:
        raw = self.read_body()
        path = urlsplit(self.path).path.rstrip("/")  # absolute-form when asked as a proxy
        try:
            if path == "/o/oauth2/token":
                form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                status, answer = self.cloud.token(form)
            else:
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    status, answer = invalid("Parse Error")
                else:
                    status, answer = self._route(self.command, path, body)
        except Exception as exc:  # a bug of ours: as Google answers its own
            status, answer = 500, google_error(500, "backendError", f"{type(exc).__name__}: {exc}",
                                               state="INTERNAL")
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        cloud = self.cloud
        if path.startswith("/_orch/"):
            if path == "/_orch/state" and method == "GET":
                return 200, cloud.state()
            if path == "/_orch/faults" and method == "POST":
                return cloud.set_faults(body)
            if path == "/_orch/faults" and method == "DELETE":
                with cloud.lock:
                    cloud.faults = Faults()
                    return 200, dict(cloud.faults.__dict__)
            return not_found(path)
        with cloud.lock:
            cloud.calls.append(f"{method} {path}")
        if not cloud.authorized(self.headers.get("Authorization")):
            return 401, unauthenticated()
        images = f"/compute/v1/projects/{IMAGE_PROJECT}/global/images"
        if path == images and method == "GET":
            return 200, {"kind": "compute#imageList", "items": [cloud.image()], "selfLink": API + images[11:]}
        if path.startswith(images + "/") and method == "GET":
            name = path.rpartition("/")[2]
            if path == f"{images}/family/{IMAGE_FAMILY}":  # the family's latest image
                name = IMAGE
            if name != IMAGE:
                return not_found(f"projects/{IMAGE_PROJECT}/global/images/{name}")
            return 200, cloud.image()
        base = f"/compute/v1/projects/{cloud.project}"
        if re.fullmatch(r"/compute/v1/projects/[a-z][-a-z0-9]*/global/images", path) and method == "GET" and \
                not path.startswith(base + "/"):  # another public image project: none of its images here
            return 200, {"kind": "compute#imageList", "items": [], "selfLink": API + path[11:]}
        if not path.startswith(base):
            return not_found(path)
        return self._compute(method, path[len(base):], body)

    def _compute(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        cloud = self.cloud
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/zones":
            return 200, {"kind": "compute#zoneList", "items": cloud.zones(), "selfLink": cloud.link("zones")}
        if method == "GET" and path == "/regions":
            return 200, {"kind": "compute#regionList", "items": cloud.regions(), "selfLink": cloud.link("regions")}
        if method == "GET" and len(parts) == 2 and parts[0] == "regions":
            region = next((r for r in cloud.regions() if r["name"] == parts[1]), None)
            return (200, region) if region else not_found(f"regions/{parts[1]}")
        if method == "GET" and path == "/aggregated/machineTypes":
            return 200, cloud.aggregated("machineTypes", {z: list(t.values()) for z, t in cloud.machine_types.items()})
        if method == "GET" and path == "/aggregated/instances":
            found: dict[str, list[dict[str, Any]]] = {}
            for instance in cloud.listed():
                found.setdefault(instance.zone, []).append(cloud.instance_json(instance))
            return 200, cloud.aggregated("instances", found)
        if method == "GET" and path == "/aggregated/disks":
            disks: dict[str, list[dict[str, Any]]] = {}
            for instance in cloud.listed():
                disks.setdefault(instance.zone, []).append(cloud.disk_json(instance))
            return 200, cloud.aggregated("disks", disks)
        if method == "GET" and path == "/global/networks/default":
            return 200, cloud.network()
        if method == "GET" and path == "/global/images":
            return 200, {"kind": "compute#imageList", "items": [], "selfLink": cloud.link("global/images")}
        if len(parts) < 2 or parts[0] != "zones" or parts[1] not in ZONES:
            return not_found(path.strip("/"))
        zone, rest = parts[1], parts[2:]
        if method == "GET" and not rest:
            return 200, next(z for z in cloud.zones() if z["name"] == zone)
        if method == "GET" and rest == ["machineTypes"]:
            return 200, {"kind": "compute#machineTypeList", "items": list(cloud.machine_types[zone].values())}
        if method == "GET" and len(rest) == 2 and rest[0] == "machineTypes":
            found_type = cloud.machine_types[zone].get(rest[1])
            return (200, found_type) if found_type else not_found(f"zones/{zone}/machineTypes/{rest[1]}")
        if method == "GET" and len(rest) == 2 and rest[0] == "diskTypes":
            return (200, cloud.disk_type(zone, rest[1])) if rest[1] in ("pd-standard", "pd-balanced", "pd-ssd") \
                else not_found(f"zones/{zone}/diskTypes/{rest[1]}")
        if rest == ["instances"] and method == "GET":
            return 200, {"kind": "compute#instanceList", "items": [cloud.instance_json(i) for i in cloud.listed(zone)]}
        if rest == ["instances"] and method == "POST":
            return cloud.insert(zone, body)
        if len(rest) == 2 and rest[0] == "instances":
            with cloud.lock:
                instance = cloud.instances.get((zone, rest[1]))
            if method == "DELETE":
                return cloud.delete(zone, rest[1])
            if method == "GET":
                return (200, cloud.instance_json(instance)) if instance else \
                    not_found(f"projects/{cloud.project}/zones/{zone}/instances/{rest[1]}")
        if len(rest) == 2 and rest[0] == "disks" and method == "GET":
            with cloud.lock:
                owner = cloud.instances.get((zone, rest[1]))
            return (200, cloud.disk_json(owner)) if owner else \
                not_found(f"projects/{cloud.project}/zones/{zone}/disks/{rest[1]}")
        if len(rest) == 2 and rest[0] == "operations" and method == "GET":
            with cloud.lock:
                op = cloud.operations.get(rest[1])
                return (200, copy.deepcopy(op)) if op else \
                    not_found(f"projects/{cloud.project}/zones/{zone}/operations/{rest[1]}")
        return not_found(path.strip("/"))


def serve(port: int, cloud: Cloud) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    Handler.cloud = cloud
    serve_until_signalled(server, cloud.close, f"listening on {server.server_address[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.gce", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--root", type=Path, required=True, help="folder for the instances' nodes")
    parser.add_argument("--project", required=True, help="the project's id")
    parser.add_argument("--account", required=True, help="the service account's email")
    parser.add_argument("--public-key", type=Path, required=True, help="the service account's public key (PEM)")
    parser.add_argument("--token-ttl", type=int, default=3600, help="seconds an access token lives")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    public_key = serialization.load_pem_public_key(args.public_key.read_bytes())
    assert isinstance(public_key, rsa.RSAPublicKey), "a service account's key is RSA"
    serve(args.port, Cloud(args.root, args.project, args.account, public_key, args.token_ttl))


# -- from a test -----------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceAccount:
    """A service account: its email, and its key file as the console hands it out."""

    email: str
    project: str
    private_pem: str
    public_pem: str

    @classmethod
    def generate(cls, project: str, name: str = "orch") -> ServiceAccount:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return cls(f"{name}@{project}.iam.gserviceaccount.com", project, private, public)

    def key_file(self, path: Path) -> Path:
        """The JSON key file (0600), as ``gcloud iam service-accounts keys create`` writes it."""
        data = {"type": "service_account", "project_id": self.project, "private_key_id": secrets.token_hex(20),
                "private_key": self.private_pem, "client_email": self.email,
                "client_id": str(secrets.randbits(64)), "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": "https://oauth2.googleapis.com/token"}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)
        return path


@dataclass
class GCEPeer(PeerProcess):
    """A running peer: its process, port, root and log."""

    process: subprocess.Popen[str]
    port: int
    root: Path
    log: Path

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    admin_url = proxy_url

    def leftovers(self, instance_id: str) -> list[str]:
        """What of that instance remains: the instance listed, or its node running."""
        state = self.state()
        listed = [i for i in state["instances"] if i["id"] == instance_id]
        return [f"instance {i['name']} ({i['id']}) is {i['status']}" for i in listed] + \
            [f"the node of instance {i['name']} still runs" for i in listed if i["name"] in state["backing"]]


IMAGE_LINK = f"{API}/projects/{IMAGE_PROJECT}/global/images/{IMAGE}"


def registration(peer: GCEPeer, account: ServiceAccount, key_file: Path) -> dict[str, Any]:
    """``providers/NAME.yaml`` (as YAML's JSON subset) for ``account``'s project on this
    peer, its key written to ``key_file`` (0600): docs/clouds/gce.md's registration, plus
    the driver's own ``proxy_url`` and ``secure`` options that reach the peer."""
    account.key_file(key_file)
    return {"driver": "gce", "credentials": {"key": f"file:{key_file}"}, "image": IMAGE_LINK,
            "options": {"project": account.project, "user_id": account.email, "auth_type": "SA",
                        "proxy_url": peer.proxy_url, "secure": False}}


def start_peer(root: Path, account: ServiceAccount, *, port: int = 0, token_ttl: int = 3600,
               timeout: float = 30.0) -> GCEPeer:
    """Start ``python -m tests.peers.gce`` for ``account``'s project and wait for its port."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "peer.log"
    public = root / "account.pub.pem"
    public.write_text(account.public_pem)
    process, line = start_module("tests.peers.gce", [
        "--port", str(port), "--root", str(root / "nodes"), "--project", account.project, "--account",
        account.email, "--public-key", str(public), "--token-ttl", str(token_ttl)],
        log, ready="listening on ", what="GCE", timeout=timeout)
    return GCEPeer(process, int(line.split()[-1]), root, log).answering()


if __name__ == "__main__":
    main()
