"""HTTP API v1, the runtime's way in: `POST /v1/events` (batches of events) and `GET /v1/runtime` (the
WebSocket link). Both need the runtime token when one is configured."""

from __future__ import annotations

from aiohttp import web

from sidecar.http.errors import components_of, error_response, runtime_auth_error, text_body
from sidecar.link.dispatch import apply_events
from sidecar.link.protocol import FrameInvalid
from sidecar.link.wire import parse_frame


async def ingest_events(request: web.Request) -> web.Response:
    components = components_of(request)
    if (refused := runtime_auth_error(request, components.config.runtime_token)) is not None:
        return refused
    try:
        messages = parse_frame(await text_body(request), "body")
    except FrameInvalid as invalid:
        components.link.rejected(invalid.reason)
        return error_response(400, invalid.error, list(invalid.details))
    await components.pending.caught_up()  # what is accepted becomes durable within the lag target
    # Backpressure: accept a body only when every step it can cause fits in the pending queue, so that
    # nothing accepted (202) is ever dropped and memory stays bounded. Each event causes at most two steps.
    # In fleet mode, events waiting for the database to decide them count with the steps they may cause.
    waiting = components.runtime.fleet.backlog if components.runtime.fleet is not None else 0
    if components.pending.room - 2 * waiting < 2 * len(messages):
        components.metrics.events_throttled.inc(len(messages))
        return error_response(
            429, "the sidecar is busy (pending queue full); retry after the given seconds", headers={"Retry-After": "1"}
        )
    events = components.link.accept(messages, "http")
    async with components.runtime.batch():
        await apply_events(components.runtime, events)
    return web.json_response({"accepted": len(messages)}, status=202)


async def runtime_socket(request: web.Request) -> web.StreamResponse:
    components = components_of(request)
    if (refused := runtime_auth_error(request, components.config.runtime_token)) is not None:
        return refused
    return await components.link.serve(request)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runtime", runtime_socket)
    app.router.add_post("/v1/events", ingest_events)
