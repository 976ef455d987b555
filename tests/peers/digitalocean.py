"""A DigitalOcean API v2 peer: a small stateful HTTP server that libcloud's stock
``DigitalOcean_v2_NodeDriver`` talks to, on 127.0.0.1, with real nodes behind it.

What it speaks (the shapes are libcloud's recorded responses, ``libcloud/test/compute/
fixtures/digitalocean_v2``, brought up to today's sizes, regions and images):

- auth: ``Authorization: Bearer TOKEN``; any other token (or every token, once the
  ``revoked`` fault is set) gets DigitalOcean's 401 ``{"id": "unauthorized", ...}``;
- ``GET /v2/sizes``, ``/v2/regions``, ``/v2/images``, ``/v2/images/ID-or-slug``,
  ``/v2/account``, paginated as DigitalOcean does (``per_page``, ``page``,
  ``links.pages.last``, which libcloud follows);
- SSH keys: ``GET``/``POST /v2/account/keys`` (a key already in the account is 422),
  ``GET``/``DELETE /v2/account/keys/ID-or-fingerprint``;
- droplets: ``POST /v2/droplets`` (name, region, size, image, ``ssh_keys`` by id or
  fingerprint, ``tags``, ``user_data``: each validated as DigitalOcean does), answered
  202 with the droplet ``new`` and no address; a thread then starts the droplet's real
  node (:class:`tests.peers.backing.Backing`: sshd on 127.0.0.N port 22, accepting the
  droplet's first SSH key, offering the host key of its cloud-init user data) and only
  then lists it ``active`` with that address as its public IPv4.  ``GET /v2/droplets``
  (``tag_name`` filter too), ``GET``/``DELETE /v2/droplets/ID`` (204, then the node
  stops).  A droplet is listed until it is destroyed.

Faults, through an admin path the driver never calls (``POST /_orch/faults`` with a JSON
object; ``POST /_orch/faults/clear``; ``GET /_orch/state`` for what the peer holds,
every call it answered and every error it injected):

- ``capacity``: size slugs (or ``SIZE@REGION``) refused with DigitalOcean's 422
  ``unprocessable_entity`` "Size is not available in this region.";
- ``droplet_limit``: the account's droplet limit; a create past it gets 422
  ``unprocessable_entity`` "creating this/these droplet(s) will exceed your droplet
  limit" (DigitalOcean gives both the same status and id);
- ``throttle``: the next N ``POST /v2/droplets`` get 429 ``too_many_requests`` with
  DigitalOcean's ``ratelimit-*`` headers;
- ``revoked``: every token is refused (an expired or revoked token);
- ``pending``: new droplets stay ``new`` and get no node;
- ``slow_destroy``: seconds a destroyed droplet is still listed (its node still up);
- ``create_latency``: seconds each ``POST /v2/droplets`` takes.

Run it as ``python -m tests.peers.digitalocean --port P --root DIR [--token T]``: it
prints ``listening on PORT`` once it answers; SIGTERM stops it after destroying every
node it started.  :func:`start_peer` does that and stops it by pid.

The driver reaches the peer through :class:`PeerDigitalOceanNodeDriver` (``driver:
dopeer`` with ``ORCH_DRIVER_PLUGINS=`` :data:`PLUGIN`): libcloud's stock driver
accepts no endpoint at all (its ``__init__`` drops ``host``/``port``/``secure``, and
its ``__new__`` hands every keyword argument to ``object.__new__``, which refuses
them), so the adapter changes only the endpoint.  orch subprocesses import this module
for the plugin: keep its top-level imports light.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from libcloud.compute.drivers.digitalocean import DigitalOcean_v2_NodeDriver

from tests.peers.process import PeerHandler, PeerProcess, serve_until_signalled, start_module

# -- the driver adapter ---------------------------------------------------------------------

PLUGIN = "dopeer=tests.peers.digitalocean:PeerDigitalOceanNodeDriver"
"""``ORCH_DRIVER_PLUGINS`` value that registers the adapter as driver ``dopeer``."""


class PeerDigitalOceanNodeDriver(DigitalOcean_v2_NodeDriver):
    """libcloud's ``DigitalOcean_v2_NodeDriver``, pointed at ``host:port`` (``secure``:
    HTTPS).  Every call, request and response is the stock driver's; its declaration is
    the stock table's (``type`` is still ``digitalocean``)."""

    name = "DigitalOcean (orch peer)"

    def __new__(cls, *args: Any, **kwargs: Any) -> PeerDigitalOceanNodeDriver:
        return object.__new__(cls)

    def __init__(self, key: str, secure: bool = True, host: str = "127.0.0.1", port: int | None = None,
                 **kwargs: Any) -> None:
        scheme = "https" if secure else "http"
        self._peer_url = f"{scheme}://{host}:{port or (443 if secure else 80)}"
        super().__init__(key, **kwargs)  # type: ignore[no-untyped-call]

    def _ex_connection_class_kwargs(self) -> dict[str, Any]:
        return {"url": self._peer_url}


# -- the catalogue ----------------------------------------------------------------------------

FIXTURES = Path(sys.modules[DigitalOcean_v2_NodeDriver.__module__].__file__ or "").parents[2] / \
    "test" / "compute" / "fixtures" / "digitalocean_v2"
REGIONS = {"nyc1": "New York 1", "nyc3": "New York 3", "sfo3": "San Francisco 3", "ams3": "Amsterdam 3",
           "fra1": "Frankfurt 1"}
UNAVAILABLE_REGIONS = {"ams2": "Amsterdam 2"}  # listed, "available": false: libcloud leaves it out
# slug: (vcpus, memory MB, disk GB, transfer TB, monthly $, regions (None: all))
SIZES: dict[str, tuple[int, int, int, float, float, tuple[str, ...] | None]] = {
    "s-1vcpu-512mb-10gb": (1, 512, 10, 0.5, 4.0, ("nyc1", "sfo3", "ams3", "fra1")),
    "s-1vcpu-1gb": (1, 1024, 25, 1.0, 6.0, None),
    "s-1vcpu-2gb": (1, 2048, 50, 2.0, 12.0, None),
    "s-2vcpu-2gb": (2, 2048, 60, 3.0, 18.0, None),
    "s-2vcpu-4gb": (2, 4096, 80, 4.0, 24.0, None),
    "s-4vcpu-8gb": (4, 8192, 160, 5.0, 48.0, None),
}
# id: (slug, name, distribution)
IMAGES = {129211873: ("ubuntu-24-04-x64", "24.04 (LTS) x64", "Ubuntu"),
          112929454: ("ubuntu-22-04-x64", "22.04 (LTS) x64", "Ubuntu"),
          139446432: ("debian-12-x64", "12 x64", "Debian")}
DEFAULT_TOKEN = "dop_v1_orchpeer0000000000000000000000000000000000000000000000000000"
FIRST_DROPLET_ID = 3164444
HOURS_PER_MONTH = 672  # DigitalOcean bills a month as 672 hours at most: price_hourly is monthly / 672
TAG = re.compile(r"[A-Za-z0-9:_-]{1,255}")
HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?")
USER_DATA_LIMIT = 64 * 1024


def _fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _size_json(slug: str) -> dict[str, Any]:
    template = dict(_fixture("list_sizes.json")["sizes"][0])
    vcpus, memory, disk, transfer, monthly, regions = SIZES[slug]
    template.update(slug=slug, vcpus=vcpus, memory=memory, disk=disk, transfer=transfer, price_monthly=monthly,
                    price_hourly=round(monthly / HOURS_PER_MONTH, 5), regions=sorted(regions or REGIONS),
                    available=True, description="Basic")
    return template


def _region_json(slug: str) -> dict[str, Any]:
    template = dict(_fixture("list_locations.json")["regions"][0])
    available = slug in REGIONS
    template.update(slug=slug, name=REGIONS.get(slug) or UNAVAILABLE_REGIONS[slug], available=available,
                    sizes=[s for s, spec in SIZES.items() if available and (spec[5] is None or slug in spec[5])],
                    features=["backups", "ipv6", "metadata", "install_agent", "storage", "image_transfer"])
    return template


def _image_json(image_id: int) -> dict[str, Any]:
    template = dict(_fixture("list_images.json")["images"][0])
    slug, name, distribution = IMAGES[image_id]
    template.update(id=image_id, slug=slug, name=name, distribution=distribution, public=True,
                    regions=sorted(REGIONS), min_disk_size=7, type="base", status="available",
                    size_gigabytes=2.36, description=f"{distribution} {name}", tags=[])
    return template


def fingerprint(public_key: str) -> str | None:
    """DigitalOcean's fingerprint of an OpenSSH public key line: the MD5 of its blob,
    colon-separated (None: not a key line)."""
    fields = public_key.split()
    if len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-")):
        return None
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    digest = hashlib.md5(blob).hexdigest()  # DigitalOcean's fingerprint is an MD5
    return ":".join(digest[i:i + 2] for i in range(0, 32, 2))


# -- the API --------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer in DigitalOcean's error shape: ``{"id": ..., "message": ...}``."""

    def __init__(self, status: int, error_id: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error_id, self.message = status, error_id, message
        self.headers = headers or {}


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "The resource you were accessing could not be found.")


def _unprocessable(message: str) -> ApiError:
    return ApiError(422, "unprocessable_entity", message)


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] | None = None


class Account:
    """One DigitalOcean account: its keys and droplets, the faults it is told, and the
    real nodes behind its droplets."""

    def __init__(self, root: Path, token: str) -> None:
        from tests.peers.backing import Backing  # the server's import, not the plugin's

        self.backing = Backing(root)
        self.token = token
        self.lock = threading.RLock()
        self.keys: dict[int, dict[str, Any]] = {}
        self.droplets: dict[int, dict[str, Any]] = {}
        self.user_data: dict[int, str | None] = {}
        self.faults: dict[str, Any] = {}
        self.calls: list[str] = []
        self.injected: list[dict[str, Any]] = []
        self.threads: list[threading.Thread] = []
        self.closing = False
        self._next_key = 512189
        self._next_droplet = FIRST_DROPLET_ID
        self._next_action = 1897843300

    # -- the door ------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
               body: bytes) -> Answer:
        with self.lock:
            self.calls.append(f"{method} {path}")
        try:
            self._authenticate(headers)
            return self._route(method, path, query, body)
        except ApiError as err:
            if err.status in (401, 422, 429):
                with self.lock:
                    self.injected.append({"call": f"{method} {path}", "status": err.status, "id": err.error_id,
                                          "message": err.message})
            return Answer(err.status, {"id": err.error_id, "message": err.message,
                                       "request_id": os.urandom(16).hex()}, err.headers)

    def _authenticate(self, headers: dict[str, str]) -> None:
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        with self.lock:
            revoked = bool(self.faults.get("revoked"))
        if scheme.lower() != "bearer" or token.strip() != self.token or revoked:
            raise ApiError(401, "unauthorized", "Unable to authenticate you")

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> Answer:
        parts = [p for p in path.split("/") if p]
        if parts[:1] != ["v2"]:
            raise _not_found()
        parts = parts[1:]
        if method == "GET" and parts == ["account"]:
            return Answer(200, {"account": self._account()})
        if method == "GET" and parts == ["sizes"]:
            return self._page("sizes", [_size_json(s) for s in SIZES], query)
        if method == "GET" and parts == ["regions"]:
            return self._page("regions", [_region_json(r) for r in [*REGIONS, *UNAVAILABLE_REGIONS]], query)
        if method == "GET" and parts == ["images"]:
            return self._page("images", [_image_json(i) for i in IMAGES], query)
        if method == "GET" and len(parts) == 2 and parts[0] == "images":
            return Answer(200, {"image": _image_json(self._image_id(parts[1]))})
        if parts[:2] == ["account", "keys"]:
            return self._keys(method, parts[2:], query, body)
        if parts[:1] == ["droplets"]:
            return self._droplets(method, parts[1:], query, body)
        raise _not_found()

    def _page(self, name: str, items: list[Any], query: dict[str, str], path: str | None = None) -> Answer:
        """DigitalOcean's pagination: ``per_page`` (20, at most 200) items of ``page``,
        and ``links.pages`` naming the others."""
        try:
            per_page = min(200, max(1, int(query.get("per_page", 20))))
            page = max(1, int(query.get("page", 1)))
        except ValueError:
            raise _unprocessable("per_page and page must be integers") from None
        last = max(1, -(-len(items) // per_page))
        url = f"https://api.digitalocean.com/v2/{path or name}"
        pages: dict[str, str] = {}
        if page < last:
            pages.update(next=f"{url}?page={page + 1}&per_page={per_page}",
                         last=f"{url}?page={last}&per_page={per_page}")
        if page > 1:
            pages.update(first=f"{url}?page=1&per_page={per_page}", prev=f"{url}?page={page - 1}&per_page={per_page}")
        chunk = items[(page - 1) * per_page:page * per_page]
        return Answer(200, {name: chunk, "links": {"pages": pages} if pages else {}, "meta": {"total": len(items)}})

    def _account(self) -> dict[str, Any]:
        with self.lock:
            limit = self.faults.get("droplet_limit", 25)
        return {"droplet_limit": limit, "floating_ip_limit": 3, "volume_limit": 100, "email": "orch@example.com",
                "uuid": "b6fr89dbf6d9156cace5f3c78dc9851d957381ef", "email_verified": True, "status": "active",
                "status_message": ""}

    @staticmethod
    def _image_id(ref: str | int) -> int:
        if isinstance(ref, int) or str(ref).isdigit():
            if int(ref) in IMAGES:
                return int(ref)
        else:
            for image_id, (slug, _, _) in IMAGES.items():
                if slug == ref:
                    return image_id
        raise _not_found()

    # -- SSH keys ------------------------------------------------------------------------

    def _find_key(self, ref: Any) -> dict[str, Any] | None:
        if isinstance(ref, int) and not isinstance(ref, bool):
            return self.keys.get(ref)
        if isinstance(ref, str):
            if ref.isdigit():  # in a path, an id; in a create's JSON, a string is a fingerprint
                return None
            return next((k for k in self.keys.values() if k["fingerprint"] == ref), None)
        return None

    def _keys(self, method: str, rest: list[str], query: dict[str, str], body: bytes) -> Answer:
        with self.lock:
            if method == "GET" and not rest:
                return self._page("ssh_keys", [dict(k) for k in self.keys.values()], query, "account/keys")
            if method == "POST" and not rest:
                data = _json_object(body)
                name, public_key = data.get("name"), data.get("public_key")
                if not isinstance(name, str) or not name.strip():
                    raise _unprocessable("Name can't be blank")
                printed = fingerprint(public_key) if isinstance(public_key, str) else None
                if printed is None:
                    raise _unprocessable("Key invalid type, we support 'ssh-rsa', 'ssh-dss', 'ecdsa-sha2-nistp256', "
                                         "'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521', or 'ssh-ed25519'")
                if any(k["fingerprint"] == printed for k in self.keys.values()):
                    raise _unprocessable("SSH Key is already in use on your account")
                self._next_key += 1
                key: dict[str, Any] = {"id": self._next_key, "fingerprint": printed,
                                       "public_key": str(public_key).strip(), "name": name}
                self.keys[self._next_key] = key
                return Answer(201, {"ssh_key": dict(key)})
            if len(rest) == 1:
                ref = rest[0]
                found = self.keys.get(int(ref)) if ref.isdigit() else self._find_key(ref)
                if found is None:
                    raise _not_found()
                if method == "GET":
                    return Answer(200, {"ssh_key": dict(found)})
                if method == "DELETE":
                    del self.keys[found["id"]]
                    return Answer(204)
        raise _not_found()

    # -- droplets ------------------------------------------------------------------------

    def _droplets(self, method: str, rest: list[str], query: dict[str, str], body: bytes) -> Answer:
        if method == "GET" and not rest:
            with self.lock:
                listed = [copy.deepcopy(d) for _, d in sorted(self.droplets.items())]
            tag = query.get("tag_name")
            if tag:
                listed = [d for d in listed if tag in d["tags"]]
            return self._page("droplets", listed, query)
        if method == "POST" and not rest:
            return self._create(_json_object(body))
        if len(rest) == 1 and rest[0].isdigit():
            droplet_id = int(rest[0])
            with self.lock:
                droplet = self.droplets.get(droplet_id)
                if droplet is None:
                    raise _not_found()
                if method == "GET":  # a destroyed droplet is still shown until it is gone (slow_destroy)
                    return Answer(200, {"droplet": _public(droplet)})
                if method == "DELETE":
                    if droplet.get("_destroyed"):
                        raise _not_found()
                    droplet["_destroyed"] = True
                    delay = float(self.faults.get("slow_destroy") or 0)
                    if delay:  # still listed, its node up, for a while
                        self._in_thread(self._destroy, droplet_id, delay)
                        return Answer(204)
            if method == "DELETE":
                self._destroy(droplet_id, 0)  # (outside the lock: other calls go on meanwhile)
                return Answer(204)
        raise _not_found()

    def _create(self, data: dict[str, Any]) -> Answer:
        with self.lock:
            latency = float(self.faults.get("create_latency") or 0)
        if latency:
            time.sleep(latency)
        with self.lock:
            if int(self.faults.get("throttle") or 0) > 0:
                self.faults["throttle"] = int(self.faults["throttle"]) - 1
                reset = str(int(time.time()) + 1)
                raise ApiError(429, "too_many_requests", "API Rate limit exceeded.",
                               {"ratelimit-limit": "5000", "ratelimit-remaining": "0", "ratelimit-reset": reset})
            name, region, size = data.get("name"), data.get("region"), data.get("size")
            if not isinstance(name, str) or not HOSTNAME.fullmatch(name):
                raise _unprocessable("Name Only valid hostname characters are allowed. (a-z, A-Z, 0-9, . and -)")
            if region not in REGIONS:
                raise _unprocessable("Region is not available")
            if size not in SIZES:
                raise _unprocessable("You specified an invalid size for Droplet creation.")
            spec_regions = SIZES[str(size)][5]
            capacity = set(self.faults.get("capacity") or ())
            if (spec_regions is not None and region not in spec_regions) or size in capacity or \
                    f"{size}@{region}" in capacity:
                raise _unprocessable("Size is not available in this region.")
            try:
                image_id = self._image_id(data.get("image"))  # type: ignore[arg-type]
            except ApiError:
                raise _unprocessable("You specified an invalid image for Droplet creation.") from None
            keys = []
            for ref in data.get("ssh_keys") or []:
                key = self._find_key(ref)
                if key is None:
                    raise _unprocessable("ssh_keys are invalid")
                keys.append(key)
            tags = data.get("tags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) and TAG.fullmatch(t) for t in tags):
                raise _unprocessable("tags must be names of letters, numbers, colons, dashes and underscores")
            user_data = data.get("user_data")
            if user_data is not None and (not isinstance(user_data, str) or len(user_data) > USER_DATA_LIMIT):
                raise _unprocessable("user_data must be a string of at most 64 KiB")
            live = sum(1 for d in self.droplets.values() if not d.get("_destroyed"))
            limit = self.faults.get("droplet_limit")
            if limit is not None and live + 1 > int(limit):
                raise _unprocessable("creating this/these droplet(s) will exceed your droplet limit")
            self._next_droplet += 1
            droplet_id = self._next_droplet
            droplet = self._droplet_json(droplet_id, name, str(region), str(size), image_id, tags)
            droplet["_keys"] = [k["public_key"] for k in keys]
            self.droplets[droplet_id] = droplet
            self.user_data[droplet_id] = user_data
            pending = bool(self.faults.get("pending"))
            self._next_action += 1
            action = self._next_action
        if not pending:
            self._in_thread(self._boot, droplet_id)
        return Answer(202, {"droplet": _public(droplet), "links": {"actions": [
            {"id": action, "rel": "create", "href": f"https://api.digitalocean.com/v2/actions/{action}"}]}})

    def _droplet_json(self, droplet_id: int, name: str, region: str, size: str, image_id: int,
                      tags: list[str]) -> dict[str, Any]:
        droplet = copy.deepcopy(_fixture("list_node.json")["droplet"])
        vcpus, memory, disk = SIZES[size][:3]
        droplet.update(id=droplet_id, name=name, status="new", memory=memory, vcpus=vcpus, disk=disk, locked=False,
                       created_at=_now(), size_slug=size, size=_size_json(size), image=_image_json(image_id),
                       region=_region_json(region), networks={"v4": [], "v6": []}, tags=list(tags), kernel=None,
                       backup_ids=[], snapshot_ids=[], volume_ids=[], features=["monitoring"],
                       vpc_uuid="5a4981aa-9653-4bd1-bef5-d6bff52042e4", next_backup_window=None)
        return dict(droplet)

    def _in_thread(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            if self.closing:
                return
            self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    def _boot(self, droplet_id: int) -> None:
        """The droplet's real node: started, then the droplet is ``active`` at its address."""
        with self.lock:
            droplet = self.droplets.get(droplet_id)
            if droplet is None or droplet.get("_destroyed") or self.closing:
                return
            keys, user_data, size = droplet["_keys"], self.user_data.get(droplet_id), droplet["size_slug"]
        cpus = SIZES[size][0]
        try:
            address = self.backing.start(str(droplet_id), keys[0] if keys else _unusable_key(), user_data,
                                         size=f"local-{cpus}")
        except Exception as exc:  # the droplet never comes up: DigitalOcean shows it off
            print(f"droplet {droplet_id}: its node did not start: {exc}", file=sys.stderr, flush=True)
            with self.lock:
                droplet["status"] = "off"
            return
        with self.lock:
            droplet["status"] = "active"
            droplet["networks"] = {"v4": [{"ip_address": address, "netmask": "255.0.0.0", "gateway": "127.0.0.1",
                                           "type": "public"}], "v6": []}
            gone = droplet.get("_destroyed") or self.closing
        if gone:  # destroyed while it booted
            self.backing.stop(str(droplet_id))

    def _destroy(self, droplet_id: int, delay: float) -> None:
        if delay:
            time.sleep(delay)
        self.backing.stop(str(droplet_id))
        with self.lock:
            self.droplets.pop(droplet_id, None)
            self.user_data.pop(droplet_id, None)

    # -- the admin door -------------------------------------------------------------------

    def admin(self, method: str, path: str, body: bytes) -> Answer:
        with self.lock:
            if method == "POST" and path == "/_orch/faults":
                self.faults.update(_json_object(body))
                return Answer(200, {"faults": dict(self.faults)})
            if method == "POST" and path == "/_orch/faults/clear":
                self.faults.clear()
                return Answer(200, {"faults": {}})
            if method == "GET" and path == "/_orch/state":
                return Answer(200, {
                    "droplets": [{**_public(d), "destroyed": bool(d.get("_destroyed")),
                                  "user_data": self.user_data.get(i)} for i, d in sorted(self.droplets.items())],
                    "keys": list(self.keys.values()), "faults": dict(self.faults), "calls": list(self.calls),
                    "injected": list(self.injected),
                    "nodes": {n.name: next(iter(n.public_ips or []), None) for n in self.backing.driver.list_nodes()},
                })
        raise _not_found()

    def close(self) -> None:
        """Every droplet's node gone (boots and destroys under way finish first)."""
        with self.lock:
            self.closing = True
            threads = list(self.threads)
        for thread in threads:
            thread.join(timeout=30)
        self.backing.close()


def _public(droplet: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in droplet.items() if not k.startswith("_")}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "bad_request", "The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "The request body must be a JSON object")
    return data


def _unusable_key() -> str:
    """A public key nobody holds (a droplet created without SSH keys: DigitalOcean would
    mail a root password)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


# -- HTTP --------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    account: Account


class _Handler(PeerHandler):  # quiet: tests read /_orch/state
    server: _Server
    do_PUT = PeerHandler.do_GET

    def _serve(self) -> None:
        method, body = self.command, self.read_body()
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        account = self.server.account
        if url.path.startswith("/_orch/"):
            answer = account.admin(method, url.path, body) if _admin_ok(url.path) else Answer(404)
        else:
            headers = {k.lower(): v for k, v in self.headers.items()}
            answer = account.handle(method, url.path, query, headers, body)
        payload = b"" if answer.body is None else json.dumps(answer.body).encode()
        self.send_response(answer.status)
        if payload:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (answer.headers or {"ratelimit-limit": "5000", "ratelimit-remaining": "4999"}).items():
            self.send_header(key, value)
        self.end_headers()
        if payload:
            self.wfile.write(payload)


def _admin_ok(path: str) -> bool:
    return path in ("/_orch/faults", "/_orch/faults/clear", "/_orch/state")


def serve(port: int, root: Path, token: str) -> None:
    """Serve until SIGTERM or SIGINT, then destroy every node."""
    server = _Server(("127.0.0.1", port), _Handler)
    server.account = Account(root, token)
    serve_until_signalled(server, server.account.close, f"listening on {server.server_address[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.digitalocean", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--root", type=Path, required=True, help="folder of the droplets' real nodes")
    parser.add_argument("--token", default=os.environ.get("DO_PEER_TOKEN", DEFAULT_TOKEN),
                        help="the account's API token")
    args = parser.parse_args(argv)
    serve(args.port, args.root, args.token)
    return 0


# -- for tests: a peer process ----------------------------------------------------------------


@dataclass
class Peer(PeerProcess):
    """A running peer: its process, port and token; ``stop()`` ends it by its pid."""

    process: subprocess.Popen[str]
    port: int
    token: str
    root: Path
    STOP_TIMEOUT: ClassVar[float] = 60

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    admin_url = url

    def faults(self, **faults: Any) -> dict[str, Any]:
        """Set faults (see the module's docstring); returns every fault now set."""
        result: dict[str, Any] = super().faults(**faults)["faults"]
        return result

    def clear_faults(self) -> None:
        self._call("POST", "/_orch/faults/clear", {})

    def state(self) -> dict[str, Any]:
        """The droplets (with ``destroyed`` and ``user_data``), keys, faults, calls,
        injected errors, and the real nodes by droplet id with their addresses."""
        return super().state()


def start_peer(root: Path, *, token: str = DEFAULT_TOKEN, timeout: float = 30) -> Peer:
    """Start ``python -m tests.peers.digitalocean`` on a free port; returns once it answers."""
    root.mkdir(parents=True, exist_ok=True)
    process, line = start_module("tests.peers.digitalocean", ["--port", "0", "--root", str(root / "nodes"),
                                                             "--token", token],
                                 root / "peer.log", ready="listening on ", what="DigitalOcean", timeout=timeout)
    return Peer(process, int(line.rsplit(" ", 1)[1]), token, root).answering()


if __name__ == "__main__":
    sys.exit(main())
