"""`GET /v1/closures`: the closure log through the API, newest first, filtered and paginated (a `next` cursor)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from aiohttp import web

from sidecar.events.reader import parse_timestamp
from sidecar.http.requests import components_of
from sidecar.ports import ClosureQuery
from sidecar.rules.inputs import MAX_ID, ascii_id, text_problem
from sidecar.rules.policy import CloseReason
from sidecar.runtime import InvalidInput

MAX_LIMIT = 1000
T = TypeVar("T")


def optional_query(request: web.Request, name: str, parse: Callable[[str], T | None], problem: str) -> T | None:
    """A query parameter that may be absent; present, it must parse (else a 400 naming it)."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if (unstorable := text_problem(raw)) is not None:
        raise InvalidInput(name, unstorable)
    value = parse(raw)
    if value is None:
        raise InvalidInput(name, problem)
    return value


def page_limit(request: web.Request) -> int:
    """`limit`: how many entries a page holds (default 100, at most MAX_LIMIT)."""
    limit = ascii_id(request.query.get("limit", "100"), maximum=MAX_LIMIT)
    if limit is None:
        raise InvalidInput("limit", f"must be an integer from 1 to {MAX_LIMIT} (ASCII digits)")
    return limit


ID_PROBLEM = f"must be a positive integer up to {MAX_ID} (ASCII digits)"
TIME_PROBLEM = "must be an RFC 3339 timestamp with a time zone (2026-12-01T10:00:00Z)"


def encode_cursor(started_at: datetime, closure_id: str) -> str:
    raw = json.dumps([started_at.isoformat(), closure_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor(request: web.Request) -> tuple[datetime, str] | None:
    raw = request.query.get("cursor")
    if raw is None:
        return None
    try:
        started_at, closure_id = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        at = datetime.fromisoformat(started_at)
        if at.tzinfo is None or not isinstance(closure_id, str):
            raise ValueError("not a cursor")
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidInput("cursor", "must be the `next` value of an earlier page, as it was") from None
    return at, closure_id


async def list_closures(request: web.Request) -> web.Response:
    reason = request.query.get("reason")
    if reason is not None and reason not in {str(r) for r in CloseReason}:
        raise InvalidInput("reason", f"must be one of {', '.join(str(r) for r in CloseReason)}")
    limit = page_limit(request)
    query = ClosureQuery(
        limit=limit,
        organization_id=optional_query(request, "organizationId", ascii_id, ID_PROBLEM),
        organization_phone_id=optional_query(request, "organizationPhoneId", ascii_id, ID_PROBLEM),
        reason=reason,
        since=optional_query(request, "since", parse_timestamp, TIME_PROBLEM),
        until=optional_query(request, "until", parse_timestamp, TIME_PROBLEM),
        before=_cursor(request),
    )
    records = await components_of(request).store.list_closures(query)
    last = records[-1] if len(records) == limit else None
    following = encode_cursor(last.started_at, last.closure_id) if last is not None else None
    return web.json_response({"closures": [record.to_json() for record in records], "next": following})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/closures", list_closures)
