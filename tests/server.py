"""Runs the real sidecar app (create_app) on a free loopback port for tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from sidecar.app import Extras, create_app
from sidecar.components import COMPONENTS, Components
from sidecar.config import Config
from tests.waiting import eventually


@dataclass
class Served:
    app: web.Application
    base: str

    @property
    def ws_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/v1/runtime"

    @property
    def components(self) -> Components:
        return self.app[COMPONENTS]


def sidecar_config(database: str | None, **changes: Any) -> Config:
    return replace(Config(listen_host="127.0.0.1", listen_port=0, database_url=database), **changes)


@asynccontextmanager
async def serving(
    config: Config, wait_restored: bool = True, port: int = 0, extras: Extras | None = None
) -> AsyncIterator[Served]:
    app = create_app(config, extras)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    served = Served(app, f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        if wait_restored:
            await eventually(served.components.restored.is_set, what="stored sessions loaded")
        yield served
    finally:
        await runner.cleanup()
