"""Fault injection for the EC2 API: a small HTTP proxy on 127.0.0.1 in front of moto.

moto cannot fail ``RunInstances`` for one instance type, run out of an account's
instance quota, or throttle; the proxy does, answering the way AWS does:

=================================  ===========  ==========================================
fault                              HTTP status  when
=================================  ===========  ==========================================
``InsufficientInstanceCapacity``   500          RunInstances for a configured instance type
``InstanceLimitExceeded``          400          RunInstances past N pending+running instances
``RequestLimitExceeded``           503          the next K calls (of the configured actions)
an unheeded terminate              200          TerminateInstances, when told (below)
=================================  ===========  ==========================================

It can also hold chosen actions for a while before forwarding them (``latency``).

The body is EC2's error document (``<Response><Errors><Error><Code>...``, no namespace),
so libcloud's stock ``EC2Response.parse_error`` reads it as it reads AWS's.  Every
other request is forwarded unchanged (Host and signature included) and moto's answer
returned unchanged.  The proxy is the provider's endpoint in those tests:

>>> proxy = FaultProxy(upstream_port=moto.port).start()          # doctest: +SKIP
>>> proxy.faults.capacity_types = {"t3.nano"}                     # doctest: +SKIP
>>> proxy.port  # -> options: {host: 127.0.0.1, port: ..., secure: false}   # doctest: +SKIP

``partial=True`` lets a failing RunInstances reach moto first (an instance is made and
tagged) and then answers the error anyway: a create that failed but left a machine,
which orch must find by its tags and destroy.

``unheeded_terminations=True`` answers TerminateInstances as EC2 does (each instance
``shutting-down``) without forwarding it: moto never hears of it, and DescribeInstances
still lists the instances as they were, as EC2's eventually consistent reads may for a
while after a terminate.  A caller that confirms a destroy by listing sees it fail.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit
from xml.sax.saxutils import escape

EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
"""The namespace of AWS's EC2 answers (the proxy's own answers are in AWS's words)."""
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                        "proxy-authorization", "proxy-authenticate", "content-length"})


@dataclass
class Faults:
    """What the proxy fails; change it at any time (reads and writes hold ``lock``)."""

    capacity_types: set[str] = field(default_factory=set)
    """RunInstances for these instance types: InsufficientInstanceCapacity (HTTP 500)."""
    partial: bool = False
    """With a capacity fault: let moto make the instance first, then answer the error."""
    instance_limit: int | None = None
    """RunInstances that would pass this many pending+running instances: InstanceLimitExceeded (HTTP 400)."""
    throttle_next: int = 0
    """Answer the next K matching calls with RequestLimitExceeded (HTTP 503)."""
    throttle_actions: frozenset[str] | None = frozenset({"RunInstances"})
    """Which actions throttling applies to; None: every action."""
    latency: dict[str, float] = field(default_factory=dict)
    """Seconds to hold these actions before forwarding them (a slow API widens races)."""
    unheeded_terminations: bool = False
    """Answer TerminateInstances as done (shutting-down) without forwarding it: the instances stay."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class Injected:
    """One answer the proxy made up: the action, the EC2 error code (or "unheeded"), the instance type."""

    action: str
    code: str
    instance_type: str | None


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 forwarding to moto at ``upstream_port``."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self.injected: list[Injected] = []
        self.calls: list[str] = []  # every action seen, in order
        self._run_lock = threading.Lock()  # RunInstances one at a time, so the quota count is exact
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="ec2-fault-proxy", daemon=True)

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def injected_codes(self) -> list[str]:
        return [i.code for i in self.injected]

    # -- deciding ---------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list[tuple[str, str]],
                                                                                          bytes]:
        params = _params(path, headers, body)
        action = params.get("Action", "")
        self.calls.append(action)
        with self.faults.lock:
            throttle = self.faults.throttle_next > 0 and (
                self.faults.throttle_actions is None or action in self.faults.throttle_actions)
            if throttle:
                self.faults.throttle_next -= 1
            pause = self.faults.latency.get(action, 0.0)
            unheeded = self.faults.unheeded_terminations and action == "TerminateInstances"
        if throttle:
            return self._error(action, None, 503, "RequestLimitExceeded", "Request limit exceeded.")
        if pause:
            time.sleep(pause)
        if unheeded:
            return self._unheeded_termination(params)
        if action != "RunInstances":
            return self._forward(method, path, headers, body)
        instance_type = params.get("InstanceType")
        with self._run_lock:
            with self.faults.lock:
                capacity = instance_type in self.faults.capacity_types
                partial = self.faults.partial
                limit = self.faults.instance_limit
            if capacity:
                if partial:
                    self._forward(method, path, headers, body)
                zone = params.get("Placement.AvailabilityZone", "the Availability Zone you requested")
                return self._error(action, instance_type, 500, "InsufficientInstanceCapacity",
                                   f"We currently do not have sufficient {instance_type} capacity in {zone}. "
                                   "Our system will be working on provisioning additional capacity.")
            if limit is not None:
                wanted = int(params.get("MinCount", "1"))
                if self._live_instances(headers) + wanted > limit:
                    return self._error(action, instance_type, 400, "InstanceLimitExceeded",
                                       f"You have requested more instances ({wanted}) than your current instance "
                                       f"limit of {limit} allows for the specified instance type.")
            return self._forward(method, path, headers, body)

    def _error(self, action: str, instance_type: str | None, status: int, code: str,
               message: str) -> tuple[int, list[tuple[str, str]], bytes]:
        self.injected.append(Injected(action, code, instance_type))
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Response><Errors><Error><Code>{code}</Code><Message>{escape(message)}</Message></Error></Errors>"
                f"<RequestID>{uuid.uuid4()}</RequestID></Response>").encode()
        return status, [("Content-Type", "text/xml;charset=UTF-8")], body

    def _unheeded_termination(self, params: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        """EC2's answer to a TerminateInstances (every instance shutting-down), made up here:
        moto never hears of the call."""
        self.injected.append(Injected("TerminateInstances", "unheeded", None))
        ids = [value for key, value in params.items() if key.startswith("InstanceId.")]
        items = "".join(f"<item><instanceId>{escape(i)}</instanceId>"
                        "<currentState><code>32</code><name>shutting-down</name></currentState>"
                        "<previousState><code>16</code><name>running</name></previousState></item>"
                        for i in ids)
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<TerminateInstancesResponse xmlns="{EC2_NAMESPACE}"><requestId>{uuid.uuid4()}</requestId>'
                f"<instancesSet>{items}</instancesSet></TerminateInstancesResponse>").encode()
        return 200, [("Content-Type", "text/xml;charset=UTF-8")], body

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            return response.status, kept, data
        finally:
            conn.close()

    def _live_instances(self, headers: dict[str, str]) -> int:
        """Pending and running instances in the request's region, asked of moto."""
        query = urlencode({"Action": "DescribeInstances", "Version": "2016-11-15",
                           "Filter.1.Name": "instance-state-name", "Filter.1.Value.1": "pending",
                           "Filter.1.Value.2": "running", "MaxResults": "1000000"})  # moto pages at 100
        # moto reads the region from the credential scope and, without IAM auth
        # enforced, does not check the signature.
        region = _region(headers)
        auth = f"AWS4-HMAC-SHA256 Credential=AKIAFAULTPROXY000000/20240101/{region}/ec2/aws4_request, " \
               "SignedHeaders=host, Signature=0"
        status, _, data = self._forward("GET", f"/?{query}", {"Authorization": auth}, b"")
        if status != 200:
            raise RuntimeError(f"moto answered DescribeInstances with HTTP {status}: {data[:300]!r}")
        return len(re.findall(rb"<instanceId>", data))


def _params(path: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
    found = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if body and "x-www-form-urlencoded" in content_type:
        found.update({k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()})
    return found


def _region(headers: dict[str, str]) -> str:
    auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    match = re.search(r"Credential=[^/]+/\d+/([^/]+)/", auth)
    return match.group(1) if match else "us-east-1"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            status, out_headers, data = self.server.proxy.handle(self.command, self.path, headers, body)
        except Exception as exc:  # the proxy's own failure: tell the client, as a 502
            status, out_headers, data = 502, [("Content-Type", "text/plain")], f"fault proxy: {exc}".encode()
        self.send_response(status)
        for key, value in out_headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read .calls/.injected
        pass

