"""The HTTP API (aiohttp), routes by concern; `openapi.json` here is the contract.

sessions.py    /v1/sessions, stats, force close
safety.py      /v1/breaker, /v1/mode
ingest.py      /v1/events, /v1/runtime (WebSocket)
operations.py  /healthz, /readyz, /metrics, /v1/openapi.json, /v1/notifications
errors.py      JSON error bodies, middlewares, token checks, request bodies
"""

from __future__ import annotations

from aiohttp import web

from sidecar.http import ingest, operations, safety, sessions
from sidecar.http.errors import MAX_BODY_BYTES, input_errors, json_errors
from sidecar.http.operations import OPENAPI_PATH


def add_routes(app: web.Application) -> None:
    app.middlewares.extend([json_errors, input_errors])
    operations.add_routes(app)
    ingest.add_routes(app)
    sessions.add_routes(app)
    safety.add_routes(app)


__all__ = ["MAX_BODY_BYTES", "OPENAPI_PATH", "add_routes"]
