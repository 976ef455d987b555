"""Prometheus metrics of ``orch serve`` on a registry of its own (never the global one).

Read from the store at each scrape: ``orch_nodes{state}``, ``orch_jobs{state}``, and for
each running job ``orch_job_tasks_done_total{job}`` / ``orch_job_tasks_failed_total{job}``
(the counters its scheduler keeps in the job's progress).  Counted by the app:
``orch_http_requests_total{method,route,status}`` (route is the route's template, e.g.
``/jobs/{job_id}``, so ids never make new series).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.state import JobState, NodeState, Store
from orchestrator.workspace import Workspace

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class _StoreCollector(Collector):
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("orch_nodes", "Nodes of the workspace by state.", labels=["state"])
        jobs = GaugeMetricFamily("orch_jobs", "Jobs by state.", labels=["state"])
        done = CounterMetricFamily("orch_job_tasks_done", "Tasks done by each running job.", labels=["job"])
        failed = CounterMetricFamily("orch_job_tasks_failed", "Tasks given up by each running job.",
                                     labels=["job"])
        with Store.open(self.ws.state_db) as store:
            node_counts = dict.fromkeys(NodeState, 0)
            for node in store.list_nodes():
                node_counts[node.state] += 1
            job_counts = dict.fromkeys(JobState, 0)
            for job in store.list_jobs():
                job_counts[job.state] += 1
                if job.state == JobState.RUNNING:
                    counters = store.job_progress(job.id).get("counters", {})
                    done.add_metric([job.id], float(counters.get("done", 0)))
                    failed.add_metric([job.id], float(counters.get("failed", 0)))
        for node_state, count in node_counts.items():
            nodes.add_metric([node_state.value], count)
        for job_state, count in job_counts.items():
            jobs.add_metric([job_state.value], count)
        yield from (nodes, jobs, done, failed)


class Metrics:
    """The app's registry: the store collector and the HTTP request counter."""

    def __init__(self, ws: Workspace) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StoreCollector(ws))
        self.requests = Counter("orch_http_requests", "HTTP requests by method, route and status.",
                                ["method", "route", "status"], registry=self.registry)

    def count_request(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method=method, route=route, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
