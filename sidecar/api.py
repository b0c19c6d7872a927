"""HTTP API v1 (aiohttp): sessions, stats, force close, event ingest, health. Every error is JSON."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from sidecar import api_safety
from sidecar.api_common import api_auth_error, bearer_matches, components_of, error_response, json_body
from sidecar.components import Components
from sidecar.link.dispatch import apply_event
from sidecar.link.protocol import MAX_ID, CommandAck, FrameInvalid, parse_messages
from sidecar.link.server import YIELD_EVERY
from sidecar.policy import is_healthy
from sidecar.ports import StoreUnavailable
from sidecar.runtime import InvalidInput, Session, UnknownSession

log = logging.getLogger("sidecar.api")

MAX_BODY_BYTES = 4 * 1024 * 1024
OPENAPI_PATH = Path(__file__).parent / "openapi.json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text errors (404, 405, 413, …) and crashes into JSON bodies."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        if error.status == 413:
            return error_response(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        return error_response(
            error.status, error.reason, headers={"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        )
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal error; see the sidecar's log")


def runtime_auth_error(request: web.Request, token: str | None) -> web.Response | None:
    if token is not None and not bearer_matches(request, token):
        return error_response(
            401,
            "missing or wrong runtime token (Authorization: Bearer <WA_SIDECAR_RUNTIME_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


def _phone_id(request: web.Request) -> int:
    raw = request.match_info["organizationPhoneId"]
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ID:
        raise InvalidInput("organizationPhoneId", f"must be a positive integer up to {MAX_ID}")
    return int(raw)


def _timestamp(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def session_json(components: Components, session: Session) -> dict[str, Any]:
    counters = session.state.counters
    return {
        "organizationId": session.phone.organization_id,
        "organizationPhoneId": session.organization_phone_id,
        "state": str(session.state.phase),
        "connected": session.connected,
        "badMacErrors": counters.bad_mac_errors,
        "badDecryptErrors": counters.bad_decrypt_errors,
        "isHealthy": is_healthy(counters, components.runtime.policy.limits),
        "lastErrorAt": _timestamp(session.last_error_at),
    }


async def list_sessions(request: web.Request) -> web.Response:
    components = components_of(request)
    state = request.query.get("state")
    if state is not None and state not in ("active", "held", "closing"):
        raise InvalidInput("state", "must be active, held or closing (closed sessions are forgotten)")
    healthy = request.query.get("healthy")
    if healthy is not None and healthy not in ("true", "false"):
        raise InvalidInput("healthy", "must be true or false")
    sessions = [session_json(components, s) for s in components.runtime.sessions()]
    if state is not None:
        sessions = [s for s in sessions if s["state"] == state]
    if healthy is not None:
        sessions = [s for s in sessions if s["isHealthy"] is (healthy == "true")]
    return web.json_response({"sessions": sessions})


async def session_stats(request: web.Request) -> web.Response:
    stats = components_of(request).runtime.get_session_error_stats(_phone_id(request))
    return web.json_response(stats)


async def close_session(request: web.Request) -> web.Response:
    components = components_of(request)
    if (refused := api_auth_error(request, "force close")) is not None:
        return refused
    phone_id = _phone_id(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("body", 'must be a JSON object such as {"reason": "Maintenance restart"}')
    reason = body.get("reason")
    if not isinstance(reason, str):
        raise InvalidInput("reason", "is required and must be a string")
    outcome = await components.runtime.force_close_session(phone_id, reason)
    record = outcome.record.to_json() if outcome.record is not None else {"organizationPhoneId": phone_id}
    return web.json_response({**record, "alreadyClosed": outcome.already_closed})


async def ingest_events(request: web.Request) -> web.Response:
    components = components_of(request)
    if (refused := runtime_auth_error(request, components.config.runtime_token)) is not None:
        return refused
    try:
        messages = parse_messages(await json_body(request))
    except FrameInvalid as invalid:
        components.link.rejected(invalid.reason)
        return error_response(400, invalid.error, list(invalid.details))
    # Backpressure: accept a body only when every step it can cause fits in the pending queue, so that
    # nothing accepted (202) is ever dropped and memory stays bounded. Each event causes at most two steps.
    if components.pending.room < 2 * len(messages):
        components.metrics.events_throttled.inc(len(messages))
        return error_response(
            429, "the sidecar is busy (pending queue full); retry after the given seconds", headers={"Retry-After": "1"}
        )
    for message in messages:
        components.link.counted(message, "http")
    for index, message in enumerate(messages, start=1):
        if isinstance(message, CommandAck):
            components.link.acknowledge(message)
        else:
            await apply_event(components.runtime, message)
        if index % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    return web.json_response({"accepted": len(messages)}, status=202)


async def runtime_socket(request: web.Request) -> web.StreamResponse:
    components = components_of(request)
    if (refused := runtime_auth_error(request, components.config.runtime_token)) is not None:
        return refused
    return await components.link.serve(request)


NOTIFICATION_STATUSES = ("pending", "delivered", "dead", "skipped")


async def list_notifications(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in NOTIFICATION_STATUSES:
        raise InvalidInput("status", f"must be one of {', '.join(NOTIFICATION_STATUSES)}")
    raw_limit = request.query.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
        raise InvalidInput("limit", "must be an integer from 1 to 1000")
    rows = await components_of(request).store.list_notifications(status, int(raw_limit))
    return web.json_response({"notifications": [row.to_json() for row in rows]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    components = components_of(request)
    reason = components.pending.unavailable_reason
    if reason is None:
        try:
            await components.store.ping()
        except StoreUnavailable as error:
            reason = str(error)
    body = {"pendingSteps": components.pending.depth, "runtimeConnections": components.link.connection_count}
    if reason is not None:
        return web.json_response({"ready": False, "reason": f"store unreachable: {reason}", **body}, status=503)
    return web.json_response({"ready": True, **body})


async def metrics(request: web.Request) -> web.StreamResponse:
    """prometheus_client's content negotiation and encoder for the fleet metrics, then the per-session
    families streamed in chunks from the session registry (see sidecar.telemetry.session_families)."""
    components = components_of(request)
    encoder, content_type = choose_encoder(",".join(request.headers.getall("Accept", [])))
    fleet: bytes = encoder(components.metrics.registry)
    eof = b"# EOF\n"
    openmetrics = fleet.endswith(eof)
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_compression()
    await response.prepare(request)
    await response.write(fleet[: -len(eof)] if openmetrics else fleet)
    async for chunk in components.families.render(components.runtime.sessions()):
        await response.write(chunk)
    if openmetrics:
        await response.write(eof)
    await response.write_eof()
    return response


async def openapi(request: web.Request) -> web.FileResponse:
    return web.FileResponse(OPENAPI_PATH, headers={"Content-Type": "application/json"})


@web.middleware
async def input_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map the runtime's input errors onto 400/404 JSON answers."""
    try:
        return await handler(request)
    except InvalidInput as error:
        return error_response(400, f"invalid {error.field}", [{"field": error.field, "problem": error.problem}])
    except FrameInvalid as error:
        return error_response(400, error.error, list(error.details))
    except UnknownSession as error:
        return error_response(404, str(error))


def add_routes(app: web.Application) -> None:
    app.middlewares.extend([json_errors, input_errors])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/runtime", runtime_socket)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/{organizationPhoneId}/stats", session_stats)
    app.router.add_post("/v1/sessions/{organizationPhoneId}/close", close_session)
    app.router.add_post("/v1/events", ingest_events)
    app.router.add_get("/v1/notifications", list_notifications)
    api_safety.add_routes(app)
