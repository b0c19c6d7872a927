"""HTTP routes: health and readiness (the runtime link and the operator API join them)."""

from __future__ import annotations

from aiohttp import web

from sidecar.components import COMPONENTS, Components
from sidecar.ports import StoreUnavailable

MAX_BODY_BYTES = 1024 * 1024


def _components(request: web.Request) -> Components:
    return request.app[COMPONENTS]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    components = _components(request)
    reason = components.pending.unavailable_reason
    if reason is None:
        try:
            await components.store.ping()
        except StoreUnavailable as error:
            reason = str(error)
    if reason is not None:
        return web.json_response(
            {
                "ready": False,
                "reason": f"store unreachable: {reason}",
                "pendingSteps": components.pending.depth,
            },
            status=503,
        )
    return web.json_response({"ready": True, "pendingSteps": components.pending.depth})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
