"""``orch serve``: the long-running control plane (REST API, metrics, the job runner).

    app.py         create_app(ws): the FastAPI app, its lifespan, the routers wired, the error handler
    bodies.py      the request bodies (pydantic models: the OpenAPI schemas of spawn, stop, exec, jobs)
    middleware.py  the token check, 500 and request count around every request; the error mapping
    deps.py        what the routes share, as FastAPI dependencies: the request's store, app.state
    routes/        one APIRouter a resource: monitor, workspace, fleet, jobs, kv
    auth.py        the workspace API token (.orch/api-token, 0600) and its check
    metrics.py     Prometheus metrics on a registry of the app's own
    health.py      HealthMonitor: nodes whose agents fall silent are marked lost (and replaced if wanted)
    autoscaler.py  Autoscaler: the families' node counts follow the running job's work
    client.py      finding a running server (.orch/serve.json) and calling it, for the CLI
    serve.py       serve(ws, host, port): bind, TLS when not on loopback, .orch/serve.json, uvicorn
"""
