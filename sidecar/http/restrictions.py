"""`GET /v1/restrictions`: what WhatsApp is doing to the fleet's numbers (the restriction timeline, shared by
replicas in fleet mode): the restrictions in force (`active=true`, the default), by phone and kind, or the history
of changes (`active=false`), newest first; filtered by organization and kind, paginated with a `next` cursor."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aiohttp import web

from sidecar.components import Components
from sidecar.http.closures import ID_PROBLEM, optional_query, page_limit
from sidecar.http.requests import components_of
from sidecar.ports import RestrictionEntry, RestrictionQuery, StoreUnavailable
from sidecar.rules.inputs import ascii_id
from sidecar.rules.records import PhoneRef
from sidecar.rules.restrictions import RestrictionKind
from sidecar.runtime import InvalidInput

SESSION_HISTORY = 20  # the changes GET /v1/sessions/{id} shows
KINDS = ", ".join(str(kind) for kind in RestrictionKind)


async def phone_restrictions(
    components: Components, organization_phone_id: int, phone: PhoneRef | None = None
) -> dict[str, Any]:
    """The `restrictions` of GET /v1/sessions/{id}: in force now, and the recent changes (newest first). While the
    store is away, for a phone this process holds (`phone`): what is in force here, no history, `stale`."""
    try:
        current, history = await components.store.phone_restrictions(organization_phone_id, SESSION_HISTORY)
    except StoreUnavailable:
        if phone is None:
            raise
        held = components.runtime.restrictions_of(organization_phone_id)
        return {"current": [RestrictionEntry.of(phone, r).to_json() for r in held], "history": [], "stale": True}
    return {"current": [e.to_json() for e in current], "history": [e.to_json() for e in history]}


def _cursor(raw: str | None, active: bool) -> tuple[tuple[int, str] | None, int | None]:
    if raw is None:
        return None, None
    try:
        value = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if active and isinstance(value, list) and len(value) == 2 and type(value[0]) is int:
            return (value[0], str(value[1])), None
        if not active and type(value) is int:
            return None, value
        raise ValueError("not a cursor")
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("cursor", "must be the `next` value of an earlier page (with the same `active`)") from None


def _next(entries: list[RestrictionEntry], limit: int, active: bool) -> str | None:
    if len(entries) < limit:
        return None
    last = entries[-1]
    value: Any = [last.organization_phone_id, last.kind] if active else last.seq
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def list_restrictions(request: web.Request) -> web.Response:
    active_text = request.query.get("active", "true")
    if active_text not in ("true", "false"):
        raise InvalidInput("active", "must be true (in force now) or false (the history of changes)")
    active = active_text == "true"
    kind = request.query.get("kind")
    if kind is not None and kind not in {str(k) for k in RestrictionKind}:
        raise InvalidInput("kind", f"must be one of {KINDS}")
    limit = page_limit(request)
    after, before = _cursor(request.query.get("cursor"), active)
    query = RestrictionQuery(
        active=active,
        limit=limit,
        organization_id=optional_query(request, "organizationId", ascii_id, ID_PROBLEM),
        kind=kind,
        after=after,
        before=before,
    )
    entries = await components_of(request).store.list_restrictions(query)
    return web.json_response({"restrictions": [e.to_json() for e in entries], "next": _next(entries, limit, active)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/restrictions", list_restrictions)
