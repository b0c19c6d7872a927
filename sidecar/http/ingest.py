"""HTTP API v1, the runtime's way in: `POST /v1/events` (batches of events) and `GET /v1/runtime` (the
WebSocket link). Both need the runtime token when one is configured."""

from __future__ import annotations

from aiohttp import web

from sidecar.events.decode import parse_frame
from sidecar.events.intake import Busy, Channel
from sidecar.events.reader import FrameInvalid
from sidecar.http.requests import components_of, error_response, runtime_auth_error, text_body


async def ingest_events(request: web.Request) -> web.Response:
    components = components_of(request)
    if (refused := runtime_auth_error(request, components.config.runtime_token)) is not None:
        return refused
    try:
        messages = parse_frame(await text_body(request), "body")
    except FrameInvalid as invalid:
        components.intake.rejected(invalid.reason)
        return error_response(400, invalid.error, list(invalid.details))
    try:
        await components.intake.take(messages, Channel.HTTP)
    except Busy:
        return error_response(
            429, "the sidecar is busy (pending queue full); retry after the given seconds", headers={"Retry-After": "1"}
        )
    return web.json_response({"accepted": len(messages)}, status=202)


async def runtime_socket(request: web.Request) -> web.StreamResponse:
    components = components_of(request)
    if (refused := runtime_auth_error(request, components.config.runtime_token)) is not None:
        return refused
    return await components.link_server.serve(request)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runtime", runtime_socket)
    app.router.add_post("/v1/events", ingest_events)
