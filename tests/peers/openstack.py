"""A small stateful OpenStack: Keystone v3 and Nova v2.1 (with Glance v2's image list)
on 127.0.0.1, enough for libcloud's stock ``openstack`` driver, with real nodes behind
its servers.

Why not mimic (the peer issue 12 names): mimic 2.2.0 installs and imports on Python
3.11, but it speaks Keystone v2.0 only (``/v2.0/tokens``, Rackspace's catalogue), and
libcloud's OpenStack 2 driver authenticates with Keystone v3 (``3.x_password``) as
current clouds do; its servers have invented 198.101.x.x addresses.  So this peer is
our own, its answers shaped from the recorded responses libcloud's wheel ships
(``libcloud/test/compute/fixtures/openstack/_v3__auth.json``,
``openstack_v1_1/_servers_12064.json``, ``_images_v2.json``, ``_flavors_detail.json``,
``_os_keypairs_create_import.json``).

What it serves (paths as a cloud's catalogue gives them):

- ``POST /v3/auth/tokens``: password auth of one user in one project (``--user``,
  ``--password``, ``--project``); 201 with ``X-Subject-Token`` and the catalogue, or
  401.  Every other call needs a live token (401 otherwise).
- Nova at ``/compute/v2.1/PROJECT``: ``flavors/detail``, ``servers`` (create, get,
  ``detail``, delete), ``os-keypairs`` (list, import, get, delete).  A server is
  BUILD until its node answers, then ACTIVE; its metadata and key pair are kept; its
  user data (base64 in the request) is decoded and handed to the node.
- Glance at ``/image``: ``v2/images``, ``v2/images/ID``.

Each server is a real node (:class:`tests.peers.backing.Backing`): a local sshd on
127.0.0.N:22 with the server's key pair and the host key of its ``#cloud-config``;
that address is the server's only address.  A deleted server's node is stopped.

Faults, through ``POST /_orch/faults`` (JSON; the driver never calls ``/_orch``), as
Nova and Keystone answer them:

- ``capacity``: the next N creates are accepted (202), then go to ERROR with Nova's
  fault ``No valid host was found. There are not enough hosts available.``;
- ``quota_instances``: a create beyond that many servers is refused 403
  ``{"forbidden": {"message": "Quota exceeded for instances: ..."}}`` (Nova since
  Pike; older Novas answered 413 ``overLimit``: ``quota_status: 413`` sends that);
- ``throttle``: the next N creates are refused 429 ``overLimit`` with ``Retry-After``;
- ``auth``: Keystone refuses the password (401) and every token is revoked;
- ``pending``: the next N creates stay BUILD for good (no node);
- ``slow_destroy``: a deleted server stays listed (``task_state: deleting``) for that
  many seconds;
- ``late_address``: servers have no address until they are ACTIVE (by default a
  server has its address in the create's answer, as Nova has its port before the
  guest runs, and is BUILD for a moment after).

``GET /_orch/state`` returns the servers (with their metadata, key pair, user data,
address), the key pairs and the faults; ``DELETE /_orch/faults`` clears the faults.

Run it with ``python -m tests.peers.openstack --port P --root DIR``: it prints
``listening on PORT`` when ready, and on SIGTERM stops every node.  From a test, use
:func:`start_peer` and :meth:`OpenStackPeer.stop` (by its pid).
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import hashlib
import json
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.peers.process import PeerHandler, PeerProcess, serve_until_signalled, start_module

USER, PASSWORD, PROJECT, DOMAIN = "orch", "orch-test-password", "orch-project", "Default"
PROJECT_ID = "9c4693dce56b493b9b83197d900f7fba"  # the fixture's project id
REGION = "RegionOne"
UBUNTU_IMAGE = "f24a3c1b-d52a-4116-91da-25b3eee8f55e"  # the fixture's image id
FLAVORS = (  # id, name, vcpus, ram MiB, disk GB
    ("1", "m1.tiny", 1, 512, 1),
    ("2", "m1.small", 1, 2048, 20),
    ("3", "m1.medium", 2, 4096, 40),
    ("4", "m1.large", 4, 8192, 80),
)
BUILD_SECONDS = 0.3  # how long a server stays BUILD once its node runs
NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


def fixture(folder: str, name: str) -> Any:
    """A recorded response of libcloud's wheel (read as a file: ``libcloud.test``
    imports test-only packages)."""
    import libcloud

    return json.loads((Path(libcloud.__file__).parent / "test/compute/fixtures" / folder / name).read_text())


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Server:
    id: str
    name: str
    flavor: str
    image: str
    key_name: str | None
    metadata: dict[str, str]
    user_data: str | None
    availability_zone: str
    created: str = field(default_factory=_now)
    status: str = "BUILD"
    task_state: str | None = "spawning"
    address: str | None = None
    fault: dict[str, Any] | None = None
    deleted_at: float | None = None  # listed as deleting until then


@dataclass
class Faults:
    capacity: int = 0
    quota_instances: int | None = None
    quota_status: int = 403
    throttle: int = 0
    auth: bool = False
    pending: int = 0
    slow_destroy: float = 0.0
    late_address: bool = False


class Cloud:
    """The peer's state: tokens, key pairs, servers, faults; one lock over all."""

    def __init__(self, root: Path, port: int) -> None:
        from tests.peers.backing import Backing  # (imports orch's local driver)

        self.backing = Backing(root)
        self.port = port
        self.lock = threading.RLock()
        self.start_lock = threading.Lock()
        self.tokens: set[str] = set()
        self.key_pairs: dict[str, dict[str, Any]] = {}
        self.servers: dict[str, Server] = {}
        self.faults = Faults()
        self.calls: list[str] = []
        self.server_template = fixture("openstack_v1_1", "_servers_12064.json")["server"]
        self.image_template = fixture("openstack_v1_1", "_images_v2.json")["images"][0]
        self.flavor_template = fixture("openstack_v1_1", "_flavors_detail.json")["flavors"][0]
        self.token_template = fixture("openstack", "_v3__auth.json")

    # -- URLs --------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def compute(self) -> str:
        return f"{self.base}/compute/v2.1/{PROJECT_ID}"

    # -- Keystone ----------------------------------------------------------------------

    def token(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        try:
            auth = body["auth"]
            user = auth["identity"]["password"]["user"]
            project = auth["scope"]["project"]
        except (KeyError, TypeError):
            return 400, {"error": {"code": 400, "title": "Bad Request",
                                   "message": "Expecting to find auth.identity.password in request."}}, {}
        if self.faults.auth or user.get("name") != USER or user.get("password") != PASSWORD or \
                project.get("name") != PROJECT:
            return 401, _unauthorized(), {}
        token = uuid.uuid4().hex
        with self.lock:
            self.tokens.add(token)
        answer = copy.deepcopy(self.token_template)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        answer["token"]["expires_at"] = expires.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        answer["token"]["project"] = {"domain": {"id": "default", "name": DOMAIN}, "id": PROJECT_ID,
                                      "name": PROJECT}
        answer["token"]["user"] = {"domain": {"id": "default", "name": DOMAIN}, "id": uuid.uuid4().hex,
                                   "name": USER}
        answer["token"]["catalog"] = [
            _service("compute", "nova", self.compute),
            _service("image", "glance", f"{self.base}/image"),
            _service("network", "neutron", f"{self.base}/network"),
        ]
        return 201, answer, {"X-Subject-Token": token}

    def authorized(self, token: str | None) -> bool:
        with self.lock:
            return token is not None and token in self.tokens and not self.faults.auth

    # -- Nova --------------------------------------------------------------------------

    def flavors(self) -> list[dict[str, Any]]:
        out = []
        for flavor_id, name, vcpus, ram, disk in FLAVORS:
            flavor = copy.deepcopy(self.flavor_template)
            flavor.update(id=flavor_id, name=name, vcpus=vcpus, ram=ram, disk=disk, swap=0,
                          links=[{"href": f"{self.compute}/flavors/{flavor_id}", "rel": "self"}])
            flavor["OS-FLV-EXT-DATA:ephemeral"] = 0
            flavor["OS-FLV-DISABLED:disabled"] = False
            out.append(flavor)
        return out

    def images(self) -> list[dict[str, Any]]:
        image = copy.deepcopy(self.image_template)
        image.update(id=UBUNTU_IMAGE, name="ubuntu-22.04", os_distro="ubuntu", os_version="22.04",
                     status="active", visibility="public", architecture="x86_64",
                     self=f"/v2/images/{UBUNTU_IMAGE}", file=f"/v2/images/{UBUNTU_IMAGE}/file")
        return [image]

    def server_json(self, server: Server) -> dict[str, Any]:
        out = copy.deepcopy(self.server_template)
        addresses = {"public": [{"version": 4, "addr": server.address, "OS-EXT-IPS:type": "floating",
                                 "OS-EXT-IPS-MAC:mac_addr": "fa:16:3e:00:00:01"}]} if server.address else {}
        out.update(
            id=server.id, name=server.name, status=server.status, created=server.created, updated=_now(),
            tenant_id=PROJECT_ID, user_id=USER, metadata=dict(server.metadata), key_name=server.key_name,
            addresses=addresses, accessIPv4="", accessIPv6="", hostId=uuid.uuid5(uuid.NAMESPACE_DNS, server.id).hex,
            progress=100 if server.status == "ACTIVE" else 0,
            image={"id": server.image, "links": [{"href": f"{self.compute}/images/{server.image}",
                                                  "rel": "bookmark"}]},
            flavor={"id": server.flavor, "links": [{"href": f"{self.compute}/flavors/{server.flavor}",
                                                    "rel": "bookmark"}]},
            links=[{"href": f"{self.compute}/servers/{server.id}", "rel": "self"},
                   {"href": f"{self.base}/compute/{PROJECT_ID}/servers/{server.id}", "rel": "bookmark"}],
        )
        out.pop("uuid", None)
        out["OS-EXT-AZ:availability_zone"] = server.availability_zone
        out["OS-EXT-STS:task_state"] = server.task_state
        out["OS-EXT-STS:vm_state"] = server.status.lower()
        out["OS-EXT-STS:power_state"] = 1 if server.status == "ACTIVE" else 0
        if server.fault is not None:
            out["fault"] = server.fault
        return out

    def listed(self) -> list[Server]:
        now = time.monotonic()
        with self.lock:
            for server in [s for s in self.servers.values() if s.deleted_at is not None and s.deleted_at <= now]:
                del self.servers[server.id]
            return list(self.servers.values())

    def create(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        try:
            request = body["server"]
            name, flavor, image = str(request["name"]), str(request["flavorRef"]), str(request["imageRef"])
        except (KeyError, TypeError):
            return _bad_request("Invalid input for field/attribute server.")
        metadata = request.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            return _bad_request("Invalid input for field/attribute metadata.")
        if flavor not in {f[0] for f in FLAVORS}:
            return _bad_request(f"Flavor {flavor} could not be found.")
        if image != UBUNTU_IMAGE:
            return _bad_request(f"Can not find requested image {image}")
        key_name = request.get("key_name")
        with self.lock:
            if key_name is not None and key_name not in self.key_pairs:
                return _bad_request(f"Invalid key_name provided: {key_name}")
            if self.faults.throttle > 0:
                self.faults.throttle -= 1
                return 429, {"overLimit": {"message": "This request was rate-limited.", "code": 429,
                                           "retryAfter": "1"}}, {"Retry-After": "1"}
            live = [s for s in self.listed() if s.deleted_at is None]
            limit = self.faults.quota_instances
            if limit is not None and len(live) >= limit:
                text = f"Quota exceeded for instances: Requested 1, but already used {len(live)} of {limit} instances"
                if self.faults.quota_status == 413:
                    return 413, {"overLimit": {"message": text, "code": 413, "retryAfter": "0"}}, {}
                return 403, {"forbidden": {"message": text, "code": 403}}, {}
            try:
                user_data = base64.b64decode(request["user_data"]).decode() if request.get("user_data") else None
            except (ValueError, UnicodeDecodeError):
                return _bad_request("User data needs to be valid base 64.")
            server = Server(id=str(uuid.uuid4()), name=name, flavor=flavor, image=image, key_name=key_name,
                            metadata=dict(metadata), user_data=user_data,
                            availability_zone=str(request.get("availability_zone") or "nova"))
            self.servers[server.id] = server
            boot_now, public_key = False, None
            if self.faults.capacity > 0:
                self.faults.capacity -= 1
                server.status, server.task_state = "ERROR", None
                server.fault = {"code": 500, "created": _now(), "message": NO_VALID_HOST,
                                "details": "nova.scheduler.manager: NoValidHost"}
            elif self.faults.pending > 0:
                self.faults.pending -= 1  # stays BUILD
            else:
                public_key = self.key_pairs[key_name]["public_key"] if key_name else None
                boot_now = not self.faults.late_address
                if not boot_now:
                    threading.Thread(target=self._boot, args=(server, public_key), daemon=True).start()
        if boot_now:
            self._boot(server, public_key, build_seconds=BUILD_SECONDS)
        return 202, {"server": {"id": server.id, "links": self.server_json(server)["links"],
                                "OS-DCF:diskConfig": "MANUAL", "security_groups": [{"name": "default"}],
                                "adminPass": uuid.uuid4().hex[:12]}}, \
            {"Location": f"{self.compute}/servers/{server.id}"}

    def _boot(self, server: Server, public_key: str | None, *, build_seconds: float = 0.0) -> None:
        """Start the server's node.  ``build_seconds``: the address is the server's at once
        (Nova has its port before the guest runs) and it stays BUILD that long; else it
        has no address until it is ACTIVE (``late_address``)."""
        try:
            with self.start_lock:
                address = self.backing.start(server.id, public_key or "", server.user_data)
        except Exception as exc:  # the host failed: as Nova reports it
            with self.lock:
                server.status, server.task_state = "ERROR", None
                server.fault = {"code": 500, "created": _now(), "message": f"Build of instance failed: {exc}"}
            return
        with self.lock:
            gone = server.deleted_at is not None or server.id not in self.servers
            if not gone:
                server.address = address
                if build_seconds <= 0:
                    server.status, server.task_state = "ACTIVE", None
        if gone:
            self.backing.stop(server.id)
        elif build_seconds > 0:
            timer = threading.Timer(build_seconds, self._activate, args=(server,))
            timer.daemon = True
            timer.start()

    def _activate(self, server: Server) -> None:
        with self.lock:
            if server.status == "BUILD" and server.deleted_at is None:
                server.status, server.task_state = "ACTIVE", None

    def delete(self, server_id: str) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            server = next((s for s in self.listed() if s.id == server_id), None)
            if server is None:
                return _not_found(f"Instance {server_id} could not be found.")
            if server.deleted_at is None:
                server.task_state = "deleting"
                server.deleted_at = time.monotonic() + self.faults.slow_destroy
            delay = self.faults.slow_destroy
        if delay <= 0:
            self.backing.stop(server_id)
            self.listed()
        else:
            threading.Timer(delay, self.backing.stop, args=(server_id,)).start()
        return 204, None, {}

    def import_key(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        try:
            name = str(body["keypair"]["name"])
            public_key = str(body["keypair"]["public_key"])
        except (KeyError, TypeError):
            return _bad_request("Keypair data is invalid: public_key is required (generating keys is not served)")
        with self.lock:
            if name in self.key_pairs:
                return 409, {"conflictingRequest": {"message": f"Key pair '{name}' already exists.",
                                                    "code": 409}}, {}
            fields = public_key.split()
            digest = hashlib.md5(base64.b64decode(fields[1]) if len(fields) > 1 else b"").hexdigest()
            pair = {"name": name, "public_key": public_key, "user_id": USER,
                    "fingerprint": ":".join(digest[i:i + 2] for i in range(0, 32, 2)),
                    "type": "ssh", "created_at": _now()}
            self.key_pairs[name] = pair
        return 200, {"keypair": pair}, {}

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "servers": [{"id": s.id, "name": s.name, "status": s.status, "task_state": s.task_state,
                             "flavor": s.flavor, "image": s.image, "key_name": s.key_name, "metadata": s.metadata,
                             "user_data": s.user_data, "address": s.address,
                             "availability_zone": s.availability_zone, "deleting": s.deleted_at is not None,
                             "fault": s.fault} for s in self.listed()],
                "key_pairs": list(self.key_pairs.values()),
                "backing": sorted(n.name for n in self.backing.driver.list_nodes()),
                "faults": self.faults.__dict__,
                "calls": list(self.calls),
            }

    def set_faults(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            for key, value in body.items():
                if not hasattr(self.faults, key):
                    return _bad_request(f"no such fault {key!r}")
                setattr(self.faults, key, value)
            if body.get("auth"):
                self.tokens.clear()
            return 200, self.faults.__dict__, {}

    def close(self) -> None:
        self.backing.close()


def _service(kind: str, name: str, url: str) -> dict[str, Any]:
    return {"type": kind, "name": name, "id": uuid.uuid5(uuid.NAMESPACE_URL, url).hex,
            "endpoints": [{"url": url, "region": REGION, "region_id": REGION, "interface": interface,
                           "id": uuid.uuid5(uuid.NAMESPACE_URL, url + interface).hex}
                          for interface in ("public", "internal", "admin")]}


def _unauthorized() -> dict[str, Any]:
    return {"error": {"code": 401, "title": "Unauthorized",
                      "message": "The request you have made requires authentication."}}


def _bad_request(message: str) -> tuple[int, Any, dict[str, str]]:
    return 400, {"badRequest": {"message": message, "code": 400}}, {}


def _not_found(message: str) -> tuple[int, Any, dict[str, str]]:
    return 404, {"itemNotFound": {"message": message, "code": 404}}, {}


class Handler(PeerHandler):
    cloud: Cloud
    log_requests = True

    def _serve(self) -> None:
        raw = self.read_body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            self._answer(400, {"badRequest": {"message": "Malformed request body", "code": 400}})
            return
        try:
            status, answer, headers = self._route(self.command, self.path.split("?")[0].rstrip("/"), body)
        except Exception as exc:  # a bug of ours: as Nova answers its own
            status, answer, headers = 500, {"computeFault": {"message": f"{type(exc).__name__}: {exc}",
                                                             "code": 500}}, {}
        self._answer(status, answer, headers)

    def _answer(self, status: int, answer: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        if answer is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        cloud = self.cloud
        if path.startswith("/_orch/"):
            if path == "/_orch/state" and method == "GET":
                return 200, cloud.state(), {}
            if path == "/_orch/faults" and method == "POST":
                return cloud.set_faults(body)
            if path == "/_orch/faults" and method == "DELETE":
                with cloud.lock:
                    cloud.faults = Faults()
                return 200, cloud.faults.__dict__, {}
            return _not_found("no such admin path")
        with cloud.lock:
            cloud.calls.append(f"{method} {path}")
        if path == "/v3/auth/tokens" and method == "POST":
            return cloud.token(body)
        if not cloud.authorized(self.headers.get("X-Auth-Token")):
            return 401, _unauthorized(), {"WWW-Authenticate": f'Keystone uri="{cloud.base}"'}
        compute = f"/compute/v2.1/{PROJECT_ID}"
        if path.startswith(compute):
            return self._nova(method, path[len(compute):], body)
        if path == "/image/v2/images" and method == "GET":
            return 200, {"images": cloud.images(), "schema": "/v2/schemas/images", "first": "/v2/images"}, {}
        if path.startswith("/image/v2/images/") and method == "GET":
            image = next((i for i in cloud.images() if i["id"] == path.rsplit("/", 1)[1]), None)
            return (200, image, {}) if image else (404, {"message": "No image found", "code": 404}, {})
        return _not_found(f"no such resource {path}")

    def _nova(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        cloud = self.cloud
        if path == "/flavors/detail" and method == "GET":
            return 200, {"flavors": cloud.flavors()}, {}
        if path.startswith("/flavors/") and method == "GET":
            flavor = next((f for f in cloud.flavors() if f["id"] == path.rsplit("/", 1)[1]), None)
            return (200, {"flavor": flavor}, {}) if flavor else _not_found("Flavor could not be found.")
        if path in ("/servers/detail", "/servers") and method == "GET":
            return 200, {"servers": [cloud.server_json(s) for s in cloud.listed()]}, {}
        if path == "/servers" and method == "POST":
            return cloud.create(body)
        if path.startswith("/servers/"):
            server_id = path.split("/")[2]
            if method == "DELETE":
                return cloud.delete(server_id)
            if method == "GET":
                server = next((s for s in cloud.listed() if s.id == server_id), None)
                if server is None:
                    return _not_found(f"Instance {server_id} could not be found.")
                return 200, {"server": cloud.server_json(server)}, {}
        if path == "/os-keypairs" and method == "GET":
            with cloud.lock:
                return 200, {"keypairs": [{"keypair": dict(p)} for p in cloud.key_pairs.values()]}, {}
        if path == "/os-keypairs" and method == "POST":
            return cloud.import_key(body)
        if path.startswith("/os-keypairs/"):
            name = path.split("/")[2]
            with cloud.lock:
                pair = cloud.key_pairs.get(name)
                if pair is None:
                    return _not_found(f"Keypair {name} not found for user {USER}")
                if method == "DELETE":
                    del cloud.key_pairs[name]
                    return 202, None, {}
                return 200, {"keypair": dict(pair)}, {}
        return _not_found(f"no such resource {path}")


def serve(port: int, root: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    cloud = Cloud(root, server.server_address[1])
    Handler.cloud = cloud
    serve_until_signalled(server, cloud.close, f"listening on {server.server_address[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.openstack", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--root", type=Path, required=True, help="folder for the servers' nodes")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    serve(args.port, args.root)


# -- from a test -----------------------------------------------------------------------


@dataclass
class OpenStackPeer(PeerProcess):
    """A running peer: its process, port and log."""

    process: subprocess.Popen[str]
    port: int
    root: Path
    log: Path

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    admin_url = auth_url


def start_peer(root: Path, *, port: int = 0, timeout: float = 30.0) -> OpenStackPeer:
    """Start ``python -m tests.peers.openstack`` and wait for its port."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "peer.log"
    process, line = start_module("tests.peers.openstack", ["--port", str(port), "--root", str(root / "nodes")],
                                 log, ready="listening on ", what="OpenStack", timeout=timeout)
    return OpenStackPeer(process, int(line.split()[-1]), root, log).answering()


if __name__ == "__main__":
    main()
