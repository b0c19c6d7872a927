"""HTTP operations: liveness, readiness, the Prometheus scrape, the OpenAPI document, the notification outbox."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from sidecar.http.requests import components_of
from sidecar.ports import StoreUnavailable
from sidecar.rules.inputs import ascii_id
from sidecar.rules.policy import HealthPolicy
from sidecar.runtime import InvalidInput
from sidecar.telemetry.exposition import EOF_LINE, encoded_in_chunks

OPENAPI_PATH = Path(__file__).parent / "openapi.json"


NOTIFICATION_STATUSES = ("pending", "delivered", "dead", "skipped")


async def list_notifications(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in NOTIFICATION_STATUSES:
        raise InvalidInput("status", f"must be one of {', '.join(NOTIFICATION_STATUSES)}")
    raw_limit = request.query.get("limit", "100")
    limit = ascii_id(raw_limit, maximum=1000)
    if limit is None:
        raise InvalidInput("limit", "must be an integer from 1 to 1000 (ASCII digits)")
    rows = await components_of(request).store.list_notifications(status, limit)
    return web.json_response({"notifications": [row.to_json() for row in rows]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the database answers, its schema is migrated, and no background task is down."""
    components = components_of(request)
    reasons: list[str] = []
    reason = components.pending.unavailable_reason or components.runtime.decider.unavailable_reason
    if reason is None:
        try:
            await components.store.ping()
        except StoreUnavailable as error:
            reason = str(error)
    if reason is not None:
        reasons.append(f"store unreachable: {reason}")
    if (stalled := components.runtime.decider.stalled_reason) is not None:
        reasons.append(stalled)
    if components.schema is not None and components.schema.problem is not None:
        reasons.append(f"schema not usable: {components.schema.problem}")
    down = components.supervisor.down
    reasons += [f"background task {name} failed ({error}); restarting" for name, error in sorted(down.items())]
    body: dict[str, object] = {
        "pendingSteps": components.pending.depth,
        "pendingStepAgeSeconds": round(components.pending.oldest_age, 3),
        "undecidedEvents": components.runtime.decider.backlog,
        "oldestUndecidedEventAgeSeconds": round(components.runtime.decider.oldest_undecided_age, 3),
        "phonesWaitingOnLocks": components.runtime.decider.parked_phones,
        "runtimeConnections": components.link.connection_count,
    }
    if down:
        body["tasksDown"] = sorted(down)
    if reasons:
        return web.json_response({"ready": False, "reason": "; ".join(reasons), **body}, status=503)
    return web.json_response({"ready": True, **body})


async def metrics(request: web.Request) -> web.StreamResponse:
    """prometheus_client's content negotiation and encoder for the fleet metrics (in chunks, see
    sidecar.telemetry.exposition), then the per-session families streamed in chunks from the session registry
    (see sidecar.telemetry.session_families)."""
    components = components_of(request)
    encoder, content_type = choose_encoder(",".join(request.headers.getall("Accept", [])))
    openmetrics = content_type.startswith("application/openmetrics-text")
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_compression()
    await response.prepare(request)
    async for chunk in encoded_in_chunks(components.metrics.registry, encoder):
        await response.write(chunk)
    runtime = components.runtime
    windowed = runtime.policy.health is HealthPolicy.WINDOWED
    counters_of = runtime.counters_now if windowed else None
    liveness = runtime.liveness
    async for chunk in components.families.render(runtime, counters_of, liveness.last_inbound, liveness.troubled):
        await response.write(chunk)
    if openmetrics:
        await response.write(EOF_LINE)
    await response.write_eof()
    return response


async def openapi(request: web.Request) -> web.FileResponse:
    return web.FileResponse(OPENAPI_PATH, headers={"Content-Type": "application/json"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/notifications", list_notifications)
