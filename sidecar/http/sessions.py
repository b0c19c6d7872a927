"""HTTP API v1, sessions: list and one (live or logged out), stats (getSessionErrorStats), force close
(forceCloseSession), probe."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from sidecar.components import Components
from sidecar.http.requests import api_auth_error, components_of, json_body
from sidecar.http.restrictions import phone_restrictions
from sidecar.ports import SocketCommandFailed, SocketCommandUnsupported, SocketUnreachable
from sidecar.rules.inputs import MAX_ID, ascii_id
from sidecar.rules.policy import is_healthy
from sidecar.rules.records import PhoneRef
from sidecar.runtime import InvalidInput, SessionView, UnknownSession

LOGGED_OUT = "logged_out"  # a phone the sidecar closed: not a live session's phase
UNKNOWN = "unknown"  # no state here, but the restriction timeline knows the phone


def _phone_id(request: web.Request) -> int:
    value = ascii_id(request.match_info["organizationPhoneId"])
    if value is None:
        raise InvalidInput("organizationPhoneId", f"must be a positive integer up to {MAX_ID} (ASCII digits)")
    return value


def _timestamp(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def session_json(components: Components, session: SessionView) -> dict[str, Any]:
    counters = components.runtime.counters_now(session)
    return {
        "organizationId": session.phone.organization_id,
        "organizationPhoneId": session.organization_phone_id,
        "state": str(session.phase),
        "connected": session.connected,
        "badMacErrors": counters.bad_mac_errors,
        "badDecryptErrors": counters.bad_decrypt_errors,
        "isHealthy": is_healthy(counters, components.runtime.policy.limits),
        "lastErrorAt": _timestamp(session.last_error_at),
    }


def closed_json(components: Components, phone: PhoneRef) -> dict[str, Any]:
    """A phone the sidecar closed and logged out (a QR re-scan is needed): its counters were cleared."""
    return {
        "organizationId": phone.organization_id,
        "organizationPhoneId": phone.organization_phone_id,
        "state": LOGGED_OUT,
        "connected": False,
        "badMacErrors": 0,
        "badDecryptErrors": 0,
        "isHealthy": True,
        "lastErrorAt": None,
        "loggedOutAt": _timestamp(components.runtime.logged_out_at(phone.organization_phone_id)),
    }


async def list_sessions(request: web.Request) -> web.Response:
    components = components_of(request)
    state = request.query.get("state")
    if state is not None and state not in ("active", "held", "closing", LOGGED_OUT):
        raise InvalidInput("state", "must be active, held, closing or logged_out")
    healthy = request.query.get("healthy")
    if healthy is not None and healthy not in ("true", "false"):
        raise InvalidInput("healthy", "must be true or false")
    runtime = components.runtime
    live = () if state == LOGGED_OUT else runtime.sessions()
    chosen = (s for s in live if state is None or str(s.phase) == state)
    sessions = [session_json(components, s) for s in chosen]  # filtered first: a state query stays cheap
    if state in (None, LOGGED_OUT):
        sessions += [closed_json(components, phone) for phone in runtime.closed_phones()]
    if healthy is not None:
        sessions = [s for s in sessions if s["isHealthy"] is (healthy == "true")]
    return web.json_response({"sessions": sessions})


async def get_session(request: web.Request) -> web.Response:
    """One session as this process knows it (live, logged out by the sidecar) with its restriction timeline; a
    phone this process holds nothing of but the timeline knows (in fleet mode, another replica holds it) is
    `unknown` with its restrictions; a phone known nowhere is a 404."""
    components, phone_id = components_of(request), _phone_id(request)
    session, closed = components.runtime.session(phone_id), components.runtime.closed_phone(phone_id)
    held = session.phone if session is not None else closed
    restrictions = await phone_restrictions(components, phone_id, held)  # a held phone is answered without the store
    # messagesLost: failed messages not recovered within --loss-deadline, as this process counted them
    # messagesPending: failed messages this process still waits on (recovered, or lost at the deadline)
    losses = components.runtime
    extra = {
        "messagesLost": losses.messages_lost(phone_id),
        "messagesPending": losses.messages_pending(phone_id),
        "restrictions": restrictions,
    }
    if session is not None:
        return web.json_response({**session_json(components, session), **extra})
    if closed is not None:
        return web.json_response({**closed_json(components, closed), **extra})
    known = restrictions["current"] or restrictions["history"]
    if known:
        body = {
            "organizationId": known[0]["organizationId"],
            "organizationPhoneId": phone_id,
            "state": UNKNOWN,
            **dict.fromkeys(("connected", "badMacErrors", "badDecryptErrors", "isHealthy", "lastErrorAt")),
        }
        return web.json_response({**body, **extra})
    raise UnknownSession(phone_id)


async def session_stats(request: web.Request) -> web.Response:
    stats = await components_of(request).runtime.session_error_stats(_phone_id(request))
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


async def probe_session(request: web.Request) -> web.Response:
    """One real round trip with WhatsApp's server through the session's socket (what the liveness watch does)."""
    components = components_of(request)
    if (refused := api_auth_error(request, "session probe")) is not None:
        return refused
    phone_id = _phone_id(request)
    try:
        round_trip = await asyncio.wait_for(
            components.runtime.liveness.probe(phone_id), components.config.socket_end_timeout
        )
    except SocketUnreachable as unreachable:
        return web.json_response({"error": f"cannot probe: {unreachable}", "details": []}, status=404)
    except TimeoutError:
        return web.json_response({"organizationPhoneId": phone_id, "ok": False, "error": "timeout"})
    except SocketCommandUnsupported as unsupported:
        problem = f"the session's runtime does not implement session.probe: {unsupported}"
        return web.json_response({"error": problem, "details": []}, status=501)
    except SocketCommandFailed as failed:
        return web.json_response({"organizationPhoneId": phone_id, "ok": False, "error": str(failed)})
    return web.json_response({"organizationPhoneId": phone_id, "ok": True, "roundTripMs": round(round_trip, 3)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/{organizationPhoneId}", get_session)
    app.router.add_get("/v1/sessions/{organizationPhoneId}/stats", session_stats)
    app.router.add_post("/v1/sessions/{organizationPhoneId}/close", close_session)
    app.router.add_post("/v1/sessions/{organizationPhoneId}/probe", probe_session)
