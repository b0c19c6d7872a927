"""HTTP API v1, fleet safety: the circuit breaker and the enforce/observe mode. Changes need the API token."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from sidecar.components import Components
from sidecar.http.requests import api_auth_error, components_of, json_body
from sidecar.rules.inputs import MAX_ID, text_problem
from sidecar.rules.safety import Mode
from sidecar.runtime import InvalidInput

BREAKER_ACTIONS = ("release", "keep", "trip")


async def _breaker_json(components: Components) -> dict[str, Any]:
    view = await components.runtime.decider.safety_view()
    status, config = view.breaker, view.breaker_config
    return {
        "tripped": status.tripped,
        "trippedAt": datetime.fromtimestamp(status.tripped_at, UTC).isoformat() if status.tripped_at else None,
        "keptBy": status.kept_by,
        "closesInWindow": status.closes_in_window,
        "allowedInWindow": status.allowed_in_window,
        "heldSessions": status.held,
        "config": {
            "maxCloses": config.max_closes,
            "maxShare": config.max_share,
            "windowSeconds": config.window_seconds,
        },
    }


async def _mode_json(components: Components) -> dict[str, Any]:
    view = await components.runtime.decider.safety_view()
    return {"mode": str(view.mode), "observeOrganizations": sorted(view.observe_organizations)}


async def _operator_request(request: web.Request, what: str) -> web.Response | dict[str, Any]:
    """The API token check, then the JSON body with its `operator`: a refusal to send back, or the body."""
    if (refused := api_auth_error(request, what)) is not None:
        return refused
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    operator = body.get("operator")
    if not isinstance(operator, str) or not operator.strip() or len(operator) > 100:
        raise InvalidInput("operator", "is required: who decides (1 to 100 characters), for the closure log")
    if (problem := text_problem(operator)) is not None:
        raise InvalidInput("operator", problem)
    return body


async def get_breaker(request: web.Request) -> web.Response:
    return web.json_response(await _breaker_json(components_of(request)))


async def post_breaker(request: web.Request) -> web.Response:
    body = await _operator_request(request, "breaker control")
    if isinstance(body, web.Response):
        return body
    action = body.get("action")
    if not isinstance(action, str) or action not in BREAKER_ACTIONS:
        raise InvalidInput("action", f"must be one of {', '.join(BREAKER_ACTIONS)}")
    close_held = body.get("closeHeld", False)
    if not isinstance(close_held, bool):
        raise InvalidInput("closeHeld", "must be true or false")
    if close_held and action != "release":
        raise InvalidInput("closeHeld", "applies only to action release")
    components = components_of(request)
    controls, operator = components.runtime.decider, body["operator"].strip()
    closed: list[dict[str, Any]] = []
    if action == "release":
        closed = [record.to_json() for record in await controls.release_breaker(operator, close_held)]
    elif action == "keep":
        await controls.keep_breaker(operator)
    else:
        await controls.trip_breaker(operator)
    return web.json_response({**(await _breaker_json(components)), "closed": closed})


async def get_mode(request: web.Request) -> web.Response:
    return web.json_response(await _mode_json(components_of(request)))


async def post_mode(request: web.Request) -> web.Response:
    body = await _operator_request(request, "mode change")
    if isinstance(body, web.Response):
        return body
    mode = body.get("mode")
    if not isinstance(mode, str) or mode not in {item.value for item in Mode}:
        raise InvalidInput("mode", "must be enforce or observe")
    raw = body.get("observeOrganizations", [])
    if not isinstance(raw, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= MAX_ID for item in raw
    ):
        raise InvalidInput("observeOrganizations", "must be a list of organization ids (positive integers)")
    components = components_of(request)
    await components.runtime.decider.set_mode(Mode(mode), frozenset(raw), body["operator"].strip())
    return web.json_response(await _mode_json(components))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/breaker", get_breaker)
    app.router.add_post("/v1/breaker", post_breaker)
    app.router.add_get("/v1/mode", get_mode)
    app.router.add_post("/v1/mode", post_mode)
