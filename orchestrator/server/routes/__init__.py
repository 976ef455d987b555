"""The routes of ``orch serve``, one ``APIRouter`` a resource (grouped as their OpenAPI
tags are), wired by ``create_app``.

    monitor.py    GET / (the dashboard page), /healthz, /metrics, /events
    workspace.py  GET /info, /providers, /releases, /families
    fleet.py      GET /nodes, /agents; POST /nodes/spawn, /nodes/stop, /nodes/exec
    jobs.py       GET/POST /jobs, GET/DELETE /jobs/{job_id}, /jobs/{job_id}/result, /resume
    kv.py         GET /kv, GET/PUT/DELETE /kv/{key}

Each route calls the engine function its ``orch`` command calls and reaches the app's
objects only through ``server.deps``.  A route keeps its function's name: FastAPI makes
the OpenAPI operation id from it.
"""
