"""The HTTP API (aiohttp), routes by concern; `openapi.json` here is the contract.

sessions.py         /v1/sessions, stats, force close
safety_controls.py  /v1/breaker, /v1/mode
ingest.py           /v1/events, /v1/runtime (WebSocket)
operations.py       /healthz, /readyz, /metrics, /v1/openapi.json, /v1/notifications
closures.py         /v1/closures (the closure log, filtered and paginated)
restrictions.py     /v1/restrictions (the restriction timeline, in force or history, paginated)
idempotency.py      Idempotency-Key for /v1/events
requests.py         what every route shares: JSON error bodies, middlewares, token checks, request bodies
"""

from __future__ import annotations

from aiohttp import web

from sidecar.http import closures, ingest, operations, restrictions, safety_controls, sessions
from sidecar.http.operations import OPENAPI_PATH
from sidecar.http.requests import MAX_BODY_BYTES, input_errors, json_errors


def add_routes(app: web.Application) -> None:
    app.middlewares.extend([json_errors, input_errors])
    operations.add_routes(app)
    ingest.add_routes(app)
    sessions.add_routes(app)
    safety_controls.add_routes(app)
    closures.add_routes(app)
    restrictions.add_routes(app)


__all__ = ["MAX_BODY_BYTES", "OPENAPI_PATH", "add_routes"]
