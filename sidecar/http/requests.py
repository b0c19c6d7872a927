"""What the HTTP modules share: JSON error bodies (and the middlewares that make every error one), token
checks, request bodies."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidecar.components import COMPONENTS, Components
from sidecar.events.reader import FrameInvalid, decode_json
from sidecar.ports import StoreUnavailable
from sidecar.runtime import InvalidInput, UnknownSession
from sidecar.runtime.errors import CloseIncomplete

log = logging.getLogger("sidecar.api")

MAX_BODY_BYTES = 4 * 1024 * 1024
BODY_TIMEOUT = web.AppKey("body_timeout", float)  # seconds a client may take to send a request body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, error: str, details: list[Any] | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": error, "details": details or []}, status=status, headers=headers)


def components_of(request: web.Request) -> Components:
    return request.app[COMPONENTS]


def bearer_matches(request: web.Request, expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    try:
        presented = token.strip().encode("utf-8")
    except UnicodeError:  # bytes that are not text: not our token
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, expected.encode())


def api_auth_error(request: web.Request, what: str) -> web.Response | None:
    """Mutating operator endpoints need WA_SIDECAR_API_TOKEN; without one configured they are disabled."""
    token = components_of(request).config.api_token
    if token is None:
        return error_response(
            403, f"{what} is disabled: set WA_SIDECAR_API_TOKEN and send it as Authorization: Bearer <token>"
        )
    if not bearer_matches(request, token):
        return error_response(401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})
    return None


async def text_body(request: web.Request) -> str:
    try:
        raw = await asyncio.wait_for(request.read(), request.app[BODY_TIMEOUT])
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason="the request body did not arrive in time") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameInvalid("body is not UTF-8 text", reason="malformed") from None


async def json_body(request: web.Request) -> object:
    return decode_json(await text_body(request), "body")


def runtime_auth_error(request: web.Request, token: str | None) -> web.Response | None:
    if token is not None and not bearer_matches(request, token):
        return error_response(
            401,
            "missing or wrong runtime token (Authorization: Bearer <WA_SIDECAR_RUNTIME_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


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
    except StoreUnavailable as error:
        return error_response(503, f"PostgreSQL unreachable; fleet decisions wait for it: {error}")
    except CloseIncomplete as error:
        details = [{"field": part, "problem": step} for part, step in error.failed.items()]
        return error_response(503, f"{error}; nothing was marked closed, retry", details, {"Retry-After": "1"})
