"""A real webhook receiver on loopback that verifies signatures and answers as told."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

README = Path(__file__).parent.parent / "docs" / "concepts" / "webhooks.md"


def readme_receiver() -> Callable[[str | bytes, Mapping[str, str], bytes], Any]:
    """The webhooks page's receiver snippet, run as written: it verifies with the stock `standardwebhooks` library."""
    text = README.read_text()
    snippet = text[text.index("```python\n# receiver\n") + len("```python\n") :]
    snippet = snippet[: snippet.index("```")]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "README.md receiver", "exec"), namespace)
    return namespace["verified"]  # type: ignore[no-any-return]


verified = readme_receiver()


@dataclass
class Receiver:
    secret: bytes
    answers: list[int] = field(default_factory=list)  # statuses to answer first; 200 afterwards
    received: list[dict[str, Any]] = field(default_factory=list)
    raw: list[tuple[dict[str, str], bytes]] = field(default_factory=list)  # every request as it came
    attempts: int = 0
    forged: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        self.raw.append((dict(request.headers), body))
        if verified(self.secret, request.headers, body) is None:
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
