"""``orch serve``: the long-running control plane (REST API, metrics, the job runner).

    app.py      create_app(ws): the FastAPI app, its routes and the error mapping
    auth.py     the workspace API token (.orch/api-token, 0600) and its check
    metrics.py  Prometheus metrics on a registry of the app's own
    serve.py    serve(ws, host, port): bind, TLS when not on loopback, .orch/serve.json, uvicorn
"""
