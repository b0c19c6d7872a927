"""A real webhook receiver on loopback that verifies signatures and answers as told."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def verify(secret: bytes, headers: dict[str, str], body: bytes, tolerance: float = 300) -> bool:
    """What the README shows receivers: check the timestamp's age, then the HMAC of "<timestamp>.<body>"."""
    timestamp = headers.get("X-Sidecar-Timestamp", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("X-Sidecar-Signature", ""))


@dataclass
class Receiver:
    secret: bytes
    answers: list[int] = field(default_factory=list)  # statuses to answer first; 200 afterwards
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    forged: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if not verify(self.secret, dict(request.headers), body):
            self.forged += 1
            return web.Response(status=401)
        status = self.answers.pop(0) if self.answers else 200
        if 200 <= status < 300:
            self.received.append(json.loads(body))
        return web.Response(status=status)

    @property
    def events(self) -> list[str]:
        return [item["event"] for item in self.received]


@asynccontextmanager
async def receiving(secret: bytes, answers: list[int] | None = None, port: int = 0) -> AsyncIterator[Receiver]:
    receiver = Receiver(secret, list(answers or []))
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()
