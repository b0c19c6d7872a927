"""create_app(config): wires the parts together and owns the lifecycle of every resource."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime

from aiohttp import web

from sidecar import api
from sidecar.components import COMPONENTS, Components
from sidecar.config import Config
from sidecar.journal import Journal
from sidecar.link.server import RuntimeLink
from sidecar.observers import ActionLog, ClosureLogFile, RuntimeObserver
from sidecar.pending import PendingSteps
from sidecar.ports import SessionStore, StoreUnavailable
from sidecar.runtime import SessionRuntime
from sidecar.store.memory import MemoryStore
from sidecar.store.postgres import PostgresStore

log = logging.getLogger("sidecar.app")

RESTORE_RETRY_SECONDS = 1.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class StartupError(RuntimeError):
    pass


def create_app(
    config: Config,
    *,
    observers: Sequence[RuntimeObserver] = (),
    clock: Callable[[], datetime] = utc_now,
) -> web.Application:
    app = web.Application(client_max_size=api.MAX_BODY_BYTES)
    link = RuntimeLink()
    app.cleanup_ctx.append(_components(config, link, observers, clock))

    async def close_runtime_connections(app: web.Application) -> None:
        await link.close_all()

    app.on_shutdown.append(close_runtime_connections)
    api.add_routes(app)
    return app


def _components(
    config: Config,
    link: RuntimeLink,
    extra_observers: Sequence[RuntimeObserver],
    clock: Callable[[], datetime],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = await open_store(config, clock)
        journal = Journal(config.state_dir) if config.state_dir and config.database_url else None
        pending = PendingSteps(store, config.pending_steps_limit, journal)
        observers: list[RuntimeObserver] = [ActionLog()]
        if config.closure_log_path is not None:
            observers.append(ClosureLogFile(config.closure_log_path))
        observers.extend(extra_observers)
        runtime = SessionRuntime(
            config.policy,
            store,
            pending,
            link,
            observers,
            clock=clock,
            socket_end_timeout=config.socket_end_timeout,
            database_step_timeout=config.database_step_timeout,
        )
        link.runtime = runtime
        components = Components(config, store, pending, runtime, link)
        app[COMPONENTS] = components
        replayed = await pending.start()
        if replayed:
            log.warning("replaying %d database steps journaled before the last stop", replayed)
        restore = asyncio.create_task(_restore(components))
        try:
            yield
        finally:
            restore.cancel()
            await asyncio.gather(restore, return_exceptions=True)
            await runtime.shutdown()
            await pending.stop()
            await store.close()

    return lifecycle


async def open_store(config: Config, clock: Callable[[], datetime]) -> SessionStore:
    if config.database_url is None:
        log.warning("no database URL: using the embedded in-memory store; counters and closures are not durable")
        return MemoryStore(clock, config.schema.logged_out_status)
    store = await PostgresStore.connect(config.database_url, config.schema)
    try:
        version = await store.schema_version()
    except StoreUnavailable as error:
        log.warning("PostgreSQL is not reachable yet (%s); starting not ready", error)
        return store
    if version < store.latest_schema_version:
        await store.close()
        raise StartupError(
            f"the {config.schema.sidecar_schema!r} schema is at version {version}, this sidecar needs "
            f"{store.latest_schema_version}: run `wa-sidecar migrate` first"
        )
    return store


async def _restore(components: Components) -> None:
    """Load stored counters; while the store is away, keep trying (events are counted meanwhile)."""
    while True:
        try:
            count = await components.runtime.restore()
        except StoreUnavailable as error:
            log.warning("cannot load stored counters yet: %s", error)
            await asyncio.sleep(RESTORE_RETRY_SECONDS)
            continue
        log.info("loaded %d stored sessions", count)
        components.restored.set()
        return
