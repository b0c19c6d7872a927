"""HTTP API v1, the runtime's way in: `POST /v1/events` (batches of events) and `GET /v1/runtime` (the
WebSocket link). Both need the runtime token when one is configured."""

from __future__ import annotations

import contextlib

from aiohttp import web

from sidecar.components import Components
from sidecar.events.decode import parse_frame
from sidecar.events.intake import Busy, Channel
from sidecar.events.reader import FrameInvalid
from sidecar.events.schema import InboundMessage
from sidecar.http.idempotency import (
    IDEMPOTENCY_HEADER,
    Answered,
    IdempotencyKeys,
    KeyInProgress,
    KeyReused,
    body_digest,
    key_problem,
)
from sidecar.http.requests import components_of, error_response, runtime_auth_error, text_body
from sidecar.ports import StoreUnavailable


async def ingest_events(request: web.Request) -> web.Response:
    components = components_of(request)
    if (refused := runtime_auth_error(request, components.config.runtime_token)) is not None:
        return refused
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and (problem := key_problem(key)) is not None:
        return error_response(400, f"invalid {IDEMPOTENCY_HEADER}", [{"field": IDEMPOTENCY_HEADER, "problem": problem}])
    body = await text_body(request)
    try:
        messages = parse_frame(body, "body")
    except FrameInvalid as invalid:
        components.intake.rejected(invalid.reason)
        return error_response(400, invalid.error, list(invalid.details))
    if key is None:
        return await _take(components, messages)
    keys = components.idempotency
    try:
        first = await keys.begin(key, body_digest(body))
    except KeyReused:
        detail = [{"field": IDEMPOTENCY_HEADER, "problem": "was used with another body within the last 24 h"}]
        return error_response(422, f"{IDEMPOTENCY_HEADER} reused for a different body", detail)
    except KeyInProgress:
        return error_response(
            409, f"a post with this {IDEMPOTENCY_HEADER} is still being applied; retry", headers={"Retry-After": "1"}
        )
    except StoreUnavailable as error:
        return error_response(503, f"cannot check the {IDEMPOTENCY_HEADER}: {error}", headers={"Retry-After": "1"})
    if first is not None:
        return web.json_response(first.body, status=first.status, headers={"Idempotent-Replayed": "true"})
    try:
        response = await _take(components, messages)
    except BaseException:
        await _abandon(keys, key)
        raise
    if response.status == 202:
        with contextlib.suppress(StoreUnavailable):
            await keys.finish(key, Answered(202, {"accepted": len(messages)}))
    else:
        await _abandon(keys, key)
    return response


async def _take(components: Components, messages: list[InboundMessage]) -> web.Response:
    try:
        await components.intake.take(messages, Channel.HTTP)
    except Busy:
        return error_response(
            429, "the sidecar is busy (pending queue full); retry after the given seconds", headers={"Retry-After": "1"}
        )
    return web.json_response({"accepted": len(messages)}, status=202)


async def _abandon(keys: IdempotencyKeys, key: str) -> None:
    with contextlib.suppress(StoreUnavailable):
        await keys.abandon(key)


async def runtime_socket(request: web.Request) -> web.StreamResponse:
    components = components_of(request)
    if (refused := runtime_auth_error(request, components.config.runtime_token)) is not None:
        return refused
    return await components.link_server.serve(request)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runtime", runtime_socket)
    app.router.add_post("/v1/events", ingest_events)
