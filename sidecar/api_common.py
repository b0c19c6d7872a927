"""What the HTTP modules share: JSON errors, token checks, request bodies."""

from __future__ import annotations

import hmac
import json
from typing import Any

from aiohttp import web

from sidecar.components import COMPONENTS, Components
from sidecar.link.protocol import FrameInvalid


def error_response(
    status: int, error: str, details: list[Any] | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": error, "details": details or []}, status=status, headers=headers)


def components_of(request: web.Request) -> Components:
    return request.app[COMPONENTS]


def bearer_matches(request: web.Request, expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


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


async def json_body(request: web.Request) -> object:
    raw = await request.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FrameInvalid("body is not UTF-8 text", reason="malformed") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise FrameInvalid(f"body is not JSON: {error}", reason="malformed") from None
