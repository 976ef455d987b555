"""``orch serve`` for real: a server subprocess on a free port, two local nodes spawned
through the API, a job submitted through the API and run by the server's job runner,
and a schemathesis run over the published OpenAPI description.

The module's server and nodes are made once; teardown stops the server (SIGTERM, which
must remove .orch/serve.json and exit 0) and then every node (`orch stop --all`),
whether the tests passed or not.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.workspace import Workspace
from tests.helpers.cli import ORCH
from tests.helpers.cli import orch as run_orch
from tests.helpers.primes import primes_below
from tests.helpers.serving import Server, serving, start_server, stop_server, wait_until
from tests.helpers.workspace import primes_workspace

pytestmark = [pytest.mark.sshd, pytest.mark.slow]
NODES = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    ws = primes_workspace(tmp_path_factory.mktemp("serve") / "ws", count=NODES)
    with serving(ws) as srv:
        yield srv


@pytest.fixture(scope="module")
def spawned(server: Server) -> list[str]:
    """The module's nodes, spawned through POST /nodes/spawn."""
    response = server.post("/nodes/spawn", {"family": "workers"})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["ok"] and len(report["ready"]) == NODES, report
    return list(report["ready"])


# -- access -------------------------------------------------------------------------------------


def test_serve_json_and_the_token_file(server: Server) -> None:
    assert server.info["host"] == "127.0.0.1" and server.info["tls"] is False
    assert server.url == f"http://127.0.0.1:{server.info['port']}"
    token_file = server.ws.runtime_dir / "api-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert len(server.token) >= 32


def test_healthz_is_open_and_every_other_route_wants_the_token(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz").json()["ok"] is True
    schema = server.get("/openapi.json").json()
    routes = [(method.upper(), path) for path, item in schema["paths"].items() for method in item]
    assert len(routes) >= 18
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no/such/route")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {server.token}"},
                    {"Authorization": server.token}):
        for method, path in routes:
            if path == "/healthz":
                continue
            url = server.url + path.replace("{job_id}", "j1").replace("{key}", "k")
            response = httpx.request(method, url, headers=headers, json={"family": "workers"})
            assert response.status_code == 401, (method, path, headers, response.text)
            body = response.json()
            assert set(body) == {"error", "hint"} and "token" in body["error"]


# -- the workspace -----------------------------------------------------------------------------


def test_info_providers_releases_families(server: Server, spawned: list[str]) -> None:
    info = server.get("/info").json()
    assert info["nodes"]["by_state"]["ready"] == NODES
    assert info["nodes"]["by_family"] == {"workers": NODES}
    assert info["nodes"]["by_provider"] == {"local": NODES}
    assert info["totals"]["releases"] == 1 and info["totals"]["providers"] == 1
    cli = server.orch("info", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["nodes"] == info["nodes"]
    assert [p["name"] for p in server.get("/providers").json()] == ["local"]
    assert [r["release"] for r in server.get("/releases").json()] == ["primes@1.1.0"]
    [family] = server.get("/families").json()
    assert family["name"] == "workers" and family["nodes"] == NODES
    nodes = server.get("/nodes").json()
    assert sorted(n["id"] for n in nodes) == sorted(spawned)
    assert all(n["state"] == "ready" for n in nodes)


def test_kv_round_trip(server: Server) -> None:
    value = {"a": [1, 2.5, "x"], "b": None}
    first = server.client.put("/kv/conf.one", json=value)
    assert first.status_code == 200 and first.json() == {"key": "conf.one", "version": 1}
    assert server.client.put("/kv/conf.one", json=value).json()["version"] == 2
    assert server.get("/kv/conf.one").json() == {"key": "conf.one", "value": value}
    assert server.get("/kv", params={"prefix": "conf."}).json() == {"conf.one": value}
    wrong_type = server.client.put("/kv/conf.one", content=b"x", headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415 and "application/json" in wrong_type.json()["error"]
    assert server.client.delete("/kv/conf.one").status_code == 200
    missing = server.get("/kv/conf.one")
    assert missing.status_code == 404 and missing.json() == {"error": "no key 'conf.one'", "hint": "see GET /kv"}
    assert server.client.delete("/kv/conf.one").status_code == 404


# -- jobs ----------------------------------------------------------------------------------------


def test_a_job_submitted_through_the_api_runs_in_the_server(server: Server, spawned: list[str]) -> None:
    submitted = server.post("/jobs", {"work": "primes:count_primes", "input": "0:200000",
                                      "module_options": {"max_span": 20000}})
    assert submitted.status_code == 201, submitted.text
    job = submitted.json()["job"]
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    saw_metrics = False
    while time.monotonic() < deadline:
        status = server.get(f"/jobs/{job}").json()
        if status["state"] == "running" and not saw_metrics:
            families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
            saw_metrics = any(s.labels.get("job") == job for s in families["orch_job_tasks_done"].samples)
        if status["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert status["state"] == "done", status
    assert status["scheduler_pid"] is None and status["counters"]["failed"] == 0
    assert status["nodes"] and set(status["nodes"]) <= set(spawned)  # a node may join after the end
    result = server.get(f"/jobs/{job}/result")
    assert result.status_code == 200
    counts = [int(x) for x in result.content.split()]
    assert len(counts) == status["written"] and sum(counts) == primes_below(200_000)
    listed = server.get("/jobs").json()
    assert any(j["job"] == job and j["state"] == "done" for j in listed)
    events = server.get("/events", params={"job": job}).json()
    kinds = [e["kind"] for e in events]
    assert "job.running" in kinds and "job.done" in kinds, kinds
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    after = server.get("/events", params={"after": events[0]["id"], "limit": 1, "job": job}).json()
    assert [e["id"] for e in after] == [events[1]["id"]]
    cli = server.orch("events", "--job", job, "--json")
    assert cli.returncode == 0, cli.stderr
    assert [e["id"] for e in json.loads(cli.stdout)] == [e["id"] for e in events]
    assert server.client.delete(f"/jobs/{job}").status_code == 200
    assert server.get(f"/jobs/{job}").status_code == 404
    print(f"(saw live task metrics while running: {saw_metrics})")


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"work": "nope:count_primes", "input": "0:10"}, 404, "no release"),
    ({"work": "primes:nope", "input": "0:10"}, 400, "has no function 'nope'"),
    ({"work": "primes:count_primes", "input": "10:0"}, 400, "input"),
    ({"work": "primes:count_primes", "input": "0:10", "task_size": 2}, 400, "--task-size"),
    ({"work": "primes", "input": "0:10"}, 400, "RELEASE:FUNCTION"),
])
def test_bad_job_input_is_one_line_and_4xx(server: Server, body: dict[str, Any], status: int, words: str) -> None:
    before = server.get("/jobs").json()
    response = server.post("/jobs", body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "hint"} and words in error["error"] and "\n" not in error["error"]
    assert server.get("/jobs").json() == before


def test_not_found_and_validation(server: Server) -> None:
    assert server.get("/jobs/jnope").status_code == 404
    assert server.get("/jobs/jnope/result").status_code == 404
    assert server.client.delete("/jobs/jnope").status_code == 404
    assert server.post("/nodes/stop", {}).status_code == 422
    assert server.post("/nodes/stop", {"family": "workers", "all": True}).status_code == 422
    assert server.post("/nodes/spawn", {"family": "nope"}).status_code == 404
    assert server.post("/nodes/exec", {"family": "nope", "command": "true"}).status_code == 404
    assert server.post("/nodes/exec", {"targets": ["/nowhere/*"], "command": "true"}).status_code == 404
    assert server.post("/nodes/exec", {"targets": ["all"], "command": "true", "argv": ["true"]}).status_code == 422
    assert server.get("/events", params={"after": -1}).status_code == 422


def test_exec_has_the_shape_of_orch_exec_json(server: Server, spawned: list[str]) -> None:
    response = server.post("/nodes/exec", {"family": "workers", "command": "echo hi; echo err >&2; exit 3"})
    assert response.status_code == 200, response.text
    assert response.json() == {node: {"exit": 3, "stdout": "hi\n", "stderr": "err\n"} for node in spawned}
    one = server.post("/nodes/exec", {"nodes": [spawned[0]], "command": "echo one"}).json()
    assert one == {spawned[0]: {"exit": 0, "stdout": "one\n", "stderr": ""}}
    cli = server.orch("exec", "--json", spawned[0], "--", "echo", "one")
    assert json.loads(cli.stdout) == one
    # The CLI's targets and labels, and an argument vector: each argument quoted.
    vector = server.post("/nodes/exec", {"targets": ["/local/*/work*"], "labels": ["!gpu"],
                                         "argv": ["printf", "%s|", "a;b", "c d"]}).json()
    assert vector == {node: {"exit": 0, "stdout": "a;b|c d|", "stderr": ""} for node in spawned}


def test_exec_goes_through_the_agents_the_server_holds(server: Server, spawned: list[str]) -> None:
    # A job brings every node's agent in; they stay connected to the server after it.
    job = server.post("/jobs", {"work": "primes:count_primes", "input": "0:100000"}).json()["job"]
    wait_until(lambda: server.get(f"/jobs/{job}").json()["state"] == "done", 60, "the job done")
    wait_until(lambda: set(server.get("/agents").json()) == set(spawned), 30, "every agent connected")
    time.sleep(4)  # between jobs the server heartbeats its agents: none gives it up (they would after 3 s)
    assert set(server.get("/agents").json()) == set(spawned)
    from orchestrator.state import Store

    with Store.open(server.ws.state_db) as store:
        logs = [Path(store.get_node(n).extra["node_dir"]) / "home" / "orch" / "agent" / "agent.log" for n in spawned]
    assert not [p for p in logs if "nothing from the scheduler" in p.read_text()], "an agent gave the server up"
    # The command's parent is the agent (through SSH it would be sshd's shell).
    parent = "tr '\\0' ' ' < /proc/$PPID/cmdline"
    answers = server.post("/nodes/exec", {"family": "workers", "command": parent}).json()
    assert set(answers) == set(spawned)
    assert all(a["exit"] == 0 and "orch_agent" in a["stdout"] for a in answers.values()), answers
    cli = server.orch("exec", "--json", "workers", "--", parent)
    assert cli.returncode == 0, cli.stderr
    assert all("orch_agent" in a["stdout"] for a in json.loads(cli.stdout).values())
    # A command past its timeout: an error for that node, as the SSH path reports one.
    slow = server.post("/nodes/exec", {"nodes": [spawned[0]], "command": "sleep 30", "timeout": 0.5}).json()
    assert "error" in slow[spawned[0]] and "0.5" in slow[spawned[0]]["error"], slow
    assert server.client.delete(f"/jobs/{job}").status_code == 200


def test_a_job_with_its_own_heartbeat_retimes_the_connected_agents_and_back(server: Server,
                                                                           spawned: list[str]) -> None:
    """Agents wait between jobs beating every second; a job that wants 0.2 s (three
    silent intervals, 0.6 s, lose a node), with tasks of 0.8 s (nothing but heartbeats
    while one runs), tells them so and keeps them all, and the interval goes back to a
    second after it."""
    from orchestrator.scheduler import jobs
    from orchestrator.state import Store

    warm = server.post("/jobs", {"work": "primes:count_primes", "input": "0:1000"}).json()["job"]
    wait_until(lambda: server.get(f"/jobs/{warm}").json()["state"] == "done", 60, "the warm-up job done")
    wait_until(lambda: set(server.get("/agents").json()) == set(spawned), 30, "every agent connected")
    with Store.open(server.ws.state_db) as store:
        job = jobs.submit(server.ws, store, "primes:count_primes", input="0:40000000", target_task_seconds=0.8,
                          heartbeat_seconds=0.2).id
        logs = [Path(store.get_node(n).extra["node_dir"]) / "home" / "orch" / "agent" / "agent.log" for n in spawned]
    wait_until(lambda: server.get(f"/jobs/{job}").json()["state"] not in ("queued", "running"), 120, "the job ends")
    status = server.get(f"/jobs/{job}").json()
    assert status["state"] == "done", status
    assert status["counters"].get("nodes_lost", 0) == 0 and set(status["nodes"]) == set(spawned), status
    assert sum(int(x) for x in server.get(f"/jobs/{job}/result").content.split()) == primes_below(40_000_000)
    wait_until(lambda: all("heartbeat 0.2 s -> 1 s" in p.read_text() for p in logs), 10, "back to a second")
    time.sleep(2)  # and they stay, beating every second
    assert not [p for p in logs if "nothing from the scheduler" in p.read_text()], [p.read_text()[-800:] for p in logs]
    for path in logs:
        text = path.read_text()
        assert text.index("heartbeat 1 s -> 0.2 s") < text.rindex("heartbeat 0.2 s -> 1 s"), text[-2000:]
    assert set(server.get("/agents").json()) == set(spawned)
    for done in (warm, job):
        assert server.client.delete(f"/jobs/{done}").status_code == 200


def test_fifty_concurrent_submissions_all_complete_correctly(server: Server, spawned: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    span = 20_000
    ranges = [(i * span, (i + 1) * span) for i in range(50)]
    token = server.token

    def submit(bounds: tuple[int, int]) -> str:
        with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as c:
            answer = c.post("/jobs", json={"work": "primes:count_primes", "input": f"{bounds[0]}:{bounds[1]}"})
            assert answer.status_code == 201, answer.text
            return str(answer.json()["job"])

    with ThreadPoolExecutor(max_workers=50) as pool:
        ids = list(pool.map(submit, ranges))
    assert len(set(ids)) == 50
    wait_until(lambda: all(server.get(f"/jobs/{j}").json()["state"] not in ("queued", "running") for j in ids),
               240, "all 50 jobs ended")
    sieve = bytearray([1]) * (50 * span)
    sieve[:2] = b"\0\0"
    for i in range(2, int((50 * span) ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(range(i * i, 50 * span, i)))
    for job, (low, high) in zip(ids, ranges, strict=True):
        assert server.get(f"/jobs/{job}").json()["state"] == "done", job
        counts = [int(x) for x in server.get(f"/jobs/{job}/result").content.split()]
        assert sum(counts) == sum(sieve[low:high]), (job, low, high)
        assert server.client.delete(f"/jobs/{job}").status_code == 200


def test_orch_job_run_hands_its_job_to_the_running_server(server: Server, spawned: list[str]) -> None:
    ran = server.orch("job", "run", "primes:count_primes", "--input", "0:100000", "--json")
    assert ran.returncode == 0, ran.stderr
    outcome = json.loads(ran.stdout)
    assert outcome["state"] == "done", outcome
    events = server.get("/events", params={"job": outcome["job"]}).json()
    assert "job.done" in [e["kind"] for e in events]
    counts = [int(x) for x in server.orch("job", "result", outcome["job"]).stdout.split()]
    assert sum(counts) == primes_below(100_000)
    assert server.client.delete(f"/jobs/{outcome['job']}").status_code == 200


def test_metrics_parse(server: Server, spawned: list[str]) -> None:
    server.get("/info")
    assert httpx.get(f"{server.url}/info").status_code == 401
    response = server.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    nodes = {s.labels["state"]: s.value for s in families["orch_nodes"].samples}
    assert nodes["ready"] == NODES and set(nodes) >= {"ready", "stopped", "failed"}
    assert set(s.labels["state"] for s in families["orch_jobs"].samples) >= {"queued", "running", "done"}
    assert {"orch_job_tasks_done", "orch_job_tasks_failed"} <= set(families)
    requests = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
                for s in families["orch_http_requests"].samples if s.name.endswith("_total")}
    assert requests[("GET", "/info", "200")] >= 1
    assert any(status == "401" for _, _, status in requests)


def test_orch_events_follow_prints_new_events_as_they_come(server: Server) -> None:
    from orchestrator.state import Store

    last = max([0, *(e["id"] for e in server.get("/events", params={"limit": 10_000}).json())])
    proc = subprocess.Popen([*ORCH, "events", "--follow", "--json", "--after", str(last), "--interval", "0.1"],
                            cwd=server.ws.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Store.open(server.ws.state_db) as store:
            first = store.record_event("test.note", reason="one")
            second = store.record_event("test.note", reason="two")
        assert proc.stdout is not None
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [(e["id"], e["kind"], e["reason"]) for e in lines] == [(first, "test.note", "one"),
                                                                    (second, "test.note", "two")]
        assert [e["id"] for e in server.get("/events", params={"after": last}).json()] == [first, second]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


# -- robustness ----------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(server: Server, tmp_path: Path) -> None:
    """Fuzz every route but those that make, stop or reach nodes; no answer may be 5xx."""
    ran = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
         "-H", f"Authorization: Bearer {server.token}", "--checks", "not_a_server_error",
         "--max-examples", "10", "--exclude-path-regex", "^/nodes/(spawn|stop|exec)$",
         "--generation-database", "none", "--no-color", "--report-dir", str(tmp_path), "--seed", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    assert "Tested: 17" in ran.stdout or "passed" in ran.stdout, ran.stdout[-2000:]
    assert "Traceback" not in server.log.read_text()
    assert server.get("/healthz").status_code == 200


@pytest.mark.parametrize(("args", "words"), [
    (["serve", "--port", "70000"], "--port 70000"),
    (["serve", "--host", "no-such-host.invalid", "--port", "0"], "--host"),
    (["serve", "--port", "x"], "--port"),
    (["events", "--after", "-1"], "--after"),
])
def test_bad_cli_input_is_one_line(server: Server, args: list[str], words: str) -> None:
    ran = server.orch(*args, timeout=30)
    assert ran.returncode == 2, (ran.returncode, ran.stderr)
    assert words in ran.stderr and "Traceback" not in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr


def test_one_server_per_workspace(server: Server) -> None:
    ran = server.orch("serve", "--port", "0", timeout=30)
    assert ran.returncode == 2 and f"pid {server.proc.pid}" in ran.stderr, ran.stderr
    assert json.loads((server.ws.runtime_dir / "serve.json").read_text())["pid"] == server.proc.pid


def test_a_port_in_use_is_refused_naming_the_option(tmp_path: Path) -> None:
    ws = Workspace.init(tmp_path / "other")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        ran = subprocess.run([*ORCH, "serve", "--port", str(port)], cwd=ws.root, capture_output=True, text=True,
                             timeout=30)
    assert ran.returncode == 2 and f"--port {port}: cannot listen" in ran.stderr, ran.stderr
    assert not (ws.runtime_dir / "serve.json").exists()


def test_not_on_loopback_it_serves_https_with_the_workspace_ca(tmp_path: Path) -> None:
    """A server on 0.0.0.0 (reached on 127.0.0.1 only) of a workspace of its own."""
    ws = Workspace.init(tmp_path / "tls")
    proc, info, log = start_server(ws, "--host", "0.0.0.0", "--port", "0")
    try:
        token = (ws.runtime_dir / "api-token").read_text().strip()
        assert info["tls"] is True and info["url"].startswith("https://")
        context = ssl.create_default_context(cafile=str(ws.runtime_dir / "pki" / "ca.crt"))
        context.check_hostname = False  # the certificate names the role (orch-scheduler), not a host
        base = f"https://127.0.0.1:{info['port']}"
        with httpx.Client(verify=context) as client:
            assert client.get(f"{base}/healthz").json()["ok"] is True
            assert client.get(f"{base}/info").status_code == 401
            assert client.get(f"{base}/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{info['port']}/healthz", timeout=5)
        with pytest.raises(httpx.HTTPError):  # the system's trust store does not know the workspace CA
            httpx.get(f"{base}/healthz", timeout=5)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, log.read_text()
    assert not (ws.runtime_dir / "serve.json").exists()
    assert "Traceback" not in log.read_text()


def test_sigterm_suspends_the_running_job_and_resume_finishes_it(tmp_path: Path) -> None:
    ws = primes_workspace(tmp_path / "suspend", max_nodes=2)

    def orch(*args: str) -> subprocess.CompletedProcess[str]:
        return run_orch(ws, *args)

    proc: subprocess.Popen[str] | None = None
    try:
        assert orch("spawn", "workers").returncode == 0
        proc, info, log = start_server(ws, "--port", "0")
        with httpx.Client(base_url=info["url"], timeout=60, headers={
                "Authorization": f"Bearer {(ws.runtime_dir / 'api-token').read_text().strip()}"}) as client:
            job = client.post("/jobs", json={"work": "primes:count_primes", "input": "0:20000000",
                                             "target_task_seconds": 0.05}).json()["job"]
            wait_until(lambda: client.get(f"/jobs/{job}").json()["written"] >= 1, 60, "output of the job")
            assert stop_server(proc) == 0, log.read_text()
        status = json.loads(orch("job", "status", job, "--json").stdout)
        assert status["state"] == "suspended" and "server stopped" in status["reason"], status
        assert status["written"] >= 1 and status["scheduler_pid"] is None, status
        resumed = orch("job", "resume", job, "--json")
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["state"] == "done"
        counts = [int(x) for x in orch("job", "result", job).stdout.split()]
        assert sum(counts) == primes_below(20_000_000)
    finally:
        if proc is not None:
            stop_server(proc)
        orch("stop", "--all")


def test_resume_hands_the_job_to_a_running_server_and_a_restarted_server_goes_on(tmp_path: Path) -> None:
    ws = primes_workspace(tmp_path / "handoff", max_nodes=2)

    def orch(*args: str) -> subprocess.CompletedProcess[str]:
        return run_orch(ws, *args)

    servers: list[subprocess.Popen[str]] = []

    def serve() -> httpx.Client:
        proc, info, _ = start_server(ws, "--port", "0")
        servers.append(proc)
        return httpx.Client(base_url=info["url"], timeout=60, headers={
            "Authorization": f"Bearer {(ws.runtime_dir / 'api-token').read_text().strip()}"})

    def state(client: httpx.Client, job: str) -> dict[str, Any]:
        return client.get(f"/jobs/{job}").json()  # type: ignore[no-any-return]

    try:
        with serve() as client:
            # no node yet: the server's runner fails the job, saying why
            first = client.post("/jobs", json={"work": "primes:count_primes", "input": "0:2000000"}).json()["job"]
            wait_until(lambda: state(client, first)["state"] == "failed", 30, "the job failed")
            assert "no ready nodes" in state(client, first)["reason"]
            assert orch("spawn", "workers").returncode == 0
            # the server holds the scheduler's port: `orch job resume` queues the job there and follows it
            resumed = orch("job", "resume", first)
            assert resumed.returncode == 0, resumed.stderr
            assert f"job {first}: run by the workspace's `orch serve`" in resumed.stderr
            assert sum(int(x) for x in client.get(f"/jobs/{first}/result").content.split()) == primes_below(2_000_000)
            reasons = [e["reason"] for e in client.get("/events", params={"job": first}).json()]
            assert "queued again by `orch job resume`" in reasons, reasons
            # a server stopping mid-job suspends it ...
            second = client.post("/jobs", json={"work": "primes:count_primes", "input": "0:20000000",
                                                "target_task_seconds": 0.05}).json()["job"]
            wait_until(lambda: state(client, second)["written"] >= 1, 60, "output of the second job")
        assert stop_server(servers[-1]) == 0
        suspended = json.loads(orch("job", "status", second, "--json").stdout)
        assert suspended["state"] == "suspended" and "server stopped" in suspended["reason"], suspended
        # ... and the next server queues it again and finishes it, nobody asking
        with serve() as client:
            wait_until(lambda: state(client, second)["state"] not in ("suspended", "queued", "running"), 120,
                       "the second job ends under the new server")
            assert state(client, second)["state"] == "done", state(client, second)
            counts = [int(x) for x in client.get(f"/jobs/{second}/result").content.split()]
            assert sum(counts) == primes_below(20_000_000)
            assert len(counts) == state(client, second)["written"]
            reasons = [e["reason"] for e in client.get("/events", params={"job": second}).json()]
            assert "queued again: suspended when the server stopped" in reasons, reasons
    finally:
        for proc in servers:
            stop_server(proc)
        orch("stop", "--all")


# -- the pieces, in process ----------------------------------------------------------------------


def test_running_jobs_counters_reach_the_metrics(tmp_path: Path) -> None:
    from orchestrator.server.metrics import Metrics
    from orchestrator.state import JobState, Store

    ws = Workspace.init(tmp_path / "m")
    with Store.open(ws.state_db) as store:
        store.add_job("jrun", release="primes@1.1.0", function="count_primes", spec={})
        store.set_job_state("jrun", JobState.RUNNING, progress={"counters": {"done": 7, "failed": 2}})
        store.add_job("jq", release="primes@1.1.0", function="count_primes", spec={})
    metrics = Metrics(ws)
    metrics.count_request("GET", "/jobs/{job_id}", 404)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    done = {s.labels["job"]: s.value for s in families["orch_job_tasks_done"].samples}
    failed = {s.labels["job"]: s.value for s in families["orch_job_tasks_failed"].samples}
    assert done == {"jrun": 7} and failed == {"jrun": 2}  # queued jobs have no counters
    jobs_by_state = {s.labels["state"]: s.value for s in families["orch_jobs"].samples}
    assert jobs_by_state["running"] == 1 and jobs_by_state["queued"] == 1
    [request] = [s for s in families["orch_http_requests"].samples if s.name.endswith("_total")]
    assert request.labels == {"method": "GET", "route": "/jobs/{job_id}", "status": "404"} and request.value == 1


def test_the_runner_takes_queued_jobs_oldest_first_one_at_a_time(tmp_path: Path) -> None:
    import threading

    from orchestrator.errors import StateError
    from orchestrator.scheduler.runner import JobRunner
    from orchestrator.state import JobState, Store

    ws = Workspace.init(tmp_path / "r")
    ran: list[tuple[str, str]] = []
    running = threading.Semaphore(1)

    def fake_run(w: Workspace, store: Store, job_id: str) -> None:
        assert running.acquire(blocking=False), "two jobs at once"
        try:
            ran.append((job_id, threading.current_thread().name))
            if job_id == "j2":
                raise StateError("no ready nodes to run the job on")
            store.set_job_state(job_id, JobState.RUNNING)
            time.sleep(0.05)
            store.set_job_state(job_id, JobState.DONE)
        finally:
            running.release()

    with Store.open(ws.state_db) as store:
        for job in ("j1", "j2", "j3"):
            store.add_job(job, release="primes@1.1.0", function="count_primes", spec={})
            time.sleep(0.01)
    runner = JobRunner(ws, poll_seconds=0.05, run_job=fake_run)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while len(ran) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        with Store.open(ws.state_db) as store:
            store.add_job("j4", release="primes@1.1.0", function="count_primes", spec={})
        runner.wake()
        while len(ran) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        assert runner.stop(timeout=5)
    assert [job for job, _ in ran] == ["j1", "j2", "j3", "j4"]
    assert {thread for _, thread in ran} == {"orch-job-runner"}
    with Store.open(ws.state_db) as store:
        states = {j.id: (j.state, j.reason) for j in store.list_jobs()}
    assert states["j1"][0] == states["j3"][0] == states["j4"][0] == JobState.DONE
    assert states["j2"] == (JobState.FAILED, "no ready nodes to run the job on")
    assert runner.current is None


# -- limits: request bodies, streamed results ----------------------------------------------------


def _raw_exchange(server: Server, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[bytes, float]:
    """Send ``head`` (and ``body``) on a socket of our own; the server's whole answer (it
    closes the connection) and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.info["port"]), timeout=timeout) as sock:
        sock.sendall(head)
        if body:
            sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def _put_head(server: Server, key: str, framing: str) -> bytes:
    return (f"PUT /kv/{key} HTTP/1.1\r\nHost: orch\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


def _chunked(data: bytes, piece: int = 65536, end: bool = True) -> bytes:
    pieces = [data[i:i + piece] for i in range(0, len(data), piece)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + (b"0\r\n\r\n" if end else b"")


def test_a_body_over_the_limit_is_413_by_its_content_length_before_a_byte_is_read(server: Server) -> None:
    """Content-Length says 10 MiB and no byte of the body is ever sent: the answer comes
    anyway, so the server did not wait for (read) the body."""
    answer, took = _raw_exchange(server, _put_head(server, "limit.cl", f"Content-Length: {10 << 20}"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {"error": "request body larger than 1048576 bytes (the limit)",
                                "hint": "send less; `orch serve --max-body-bytes N` sets the limit"}
    assert took < 5
    assert server.get("/kv/limit.cl").status_code == 404


def test_a_chunked_body_over_the_limit_is_413_once_counted_past_it(server: Server) -> None:
    """A chunked body has no length: the server counts what arrives and answers 413 when
    it passes 1 MiB, without the end of the body (which is never sent)."""
    value = b'"' + b"x" * ((1 << 20) + 65536) + b'"'
    answer, took = _raw_exchange(server, _put_head(server, "limit.chunked", "Transfer-Encoding: chunked"),
                                 _chunked(value, end=False))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"larger than 1048576 bytes" in answer and took < 5
    assert server.get("/kv/limit.chunked").status_code == 404


def test_a_chunked_body_under_the_limit_reaches_the_route_whole(server: Server) -> None:
    value = {"text": "y" * 200_000, "n": 7}
    data = json.dumps(value).encode()
    answer, _ = _raw_exchange(server, _put_head(server, "limit.ok", "Transfer-Encoding: chunked\r\nConnection: close"),
                              _chunked(data, piece=4096))
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert server.get("/kv/limit.ok").json() == {"key": "limit.ok", "value": value}
    assert server.client.delete("/kv/limit.ok").status_code == 200
    assert "Traceback" not in server.log.read_text()


def test_max_body_bytes_is_the_limit_for_both_framings(tmp_path: Path) -> None:
    """``create_app(max_body_bytes=...)`` (what `orch serve --max-body-bytes` sets), in
    process: at the limit the body is read, one byte over it is 413, with a
    Content-Length and chunked (a generator's body) alike."""
    import asyncio

    from orchestrator.server.app import create_app

    ws = Workspace.init(tmp_path / "lim")
    app = create_app(ws, token="t", max_body_bytes=64)

    async def put(content: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
            return await client.put("/kv/k", content=content,
                                    headers={"Authorization": "Bearer t", "Content-Type": "application/json"})

    def chunks(data: bytes) -> Any:
        async def gen() -> Any:
            for i in range(0, len(data), 10):
                yield data[i:i + 10]
        return gen()

    at_limit, over = b'"' + b"a" * 62 + b'"', b'"' + b"a" * 63 + b'"'
    try:
        for make in (lambda d: d, chunks):
            assert asyncio.run(put(make(at_limit))).status_code == 200
            refused = asyncio.run(put(make(over)))
            assert refused.status_code == 413, refused.text
            assert refused.json()["error"] == "request body larger than 64 bytes (the limit)"
    finally:
        app.state.stores.close()


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_large_result_is_streamed_in_pieces_and_never_whole_in_memory(tmp_path: Path) -> None:
    """A job whose file sink holds 128 MiB, served by a server of its own: the answer is
    chunked (no Content-Length), comes in many pieces, is byte for byte the file, and
    the server's peak memory grows by far less than the result (holding it whole would
    add 128 MiB at least)."""
    import hashlib

    from orchestrator.state import JobState, Store

    ws = Workspace.init(tmp_path / "big")
    out = ws.root / "big.out"
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for i in range(128):
            piece = hashlib.sha256(str(i).encode()).digest() * 32768  # 1 MiB, each one different
            digest.update(piece)
            sink.write(piece)
    (ws.root / "big.out.orch-job").write_text("jbig\n")
    with Store.open(ws.state_db) as store:
        store.add_job("jbig", release="primes@1.1.0", function="count_primes", spec={"sink": "file:big.out"})
        store.set_job_state("jbig", JobState.RUNNING)
        store.set_job_state("jbig", JobState.DONE)
    with serving(ws) as srv:
        before = _peak_rss(srv.proc.pid)
        got, pieces, size = hashlib.sha256(), 0, 0
        with srv.client.stream("GET", "/jobs/jbig/result") as response:
            assert response.status_code == 200
            assert response.headers["transfer-encoding"] == "chunked"
            assert "content-length" not in response.headers
            for chunk in response.iter_raw():
                got.update(chunk)
                pieces += 1
                size += len(chunk)
        grew = _peak_rss(srv.proc.pid) - before
        print(f"(128 MiB result in {pieces} pieces; the server's peak memory grew by {grew / 2**20:.1f} MiB)")
        assert size == 128 << 20 and got.hexdigest() == digest.hexdigest()
        assert pieces >= 32
        assert grew < 40 << 20, f"the server's peak memory grew by {grew / 2**20:.1f} MiB"
        missing = srv.get("/jobs/nope/result")
        assert missing.status_code == 404 and missing.json()["error"] == "no job 'nope'"


def test_an_api_answer_for_a_workspace_with_several_problems_lists_them(tmp_path: Path) -> None:
    """In process: ``GET /families`` of a workspace whose family file has two mistakes is
    one 400 line plus each problem as an object, as ``orch validate --json`` has them."""
    import asyncio

    from orchestrator.server.app import create_app

    ws = Workspace.init(tmp_path / "bad")
    (ws.families_dir / "w.yaml").write_text("release: primes\ncount: many\nnodes: 3\n")
    app = create_app(ws, token="t")

    async def families() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
            return await client.get("/families", headers={"Authorization": "Bearer t"})

    try:
        answer = asyncio.run(families())
    finally:
        app.state.stores.close()
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error"] == "2 problems in the workspace" and body["hint"] is None
    assert [(p["file"], p["line"], p["field"]) for p in body["problems"]] == [
        ("node_families/w.yaml", 2, "count"), ("node_families/w.yaml", 3, "nodes")]
