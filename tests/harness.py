"""Builds a real SessionRuntime over a real store for tests, and sockets that behave as told."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sidecar.config import SchemaMapping
from sidecar.link.local_sockets import LocalSocketController
from sidecar.ports import SessionStore
from sidecar.rules.policy import PolicyConfig
from sidecar.runtime import KeyRemoval, SessionRuntime, assemble
from sidecar.runtime.observer import RuntimeObserver
from sidecar.store.journal import Journal
from sidecar.store.memory import MemoryStore
from sidecar.store.pending import PendingSteps
from sidecar.store.postgres import PostgresStore


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class TestSocket:
    """A runtime's socket as the in-process controller sees it; `mode` says how it answers."""

    mode: str = "ok"  # ok | hang | fail
    ended: list[str] = field(default_factory=list)
    cleared: list[tuple[str, ...]] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set, end() waits for it (to act in the middle of a close)
    ending: asyncio.Event = field(default_factory=asyncio.Event)
    clear_gate: asyncio.Event | None = None  # when set, clear_keys() waits for it (to hold a heal in flight)
    clearing: asyncio.Event = field(default_factory=asyncio.Event)

    async def end(self, reason: str) -> None:
        self.ended.append(reason)
        self.ending.set()
        if self.gate is not None:
            await self.gate.wait()
        await self._answer()

    async def clear_keys(self, key_prefixes: Sequence[str]) -> None:
        self.cleared.append(tuple(key_prefixes))
        self.clearing.set()
        if self.clear_gate is not None:
            await self.clear_gate.wait()
        await self._answer()

    async def _answer(self) -> None:
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "fail":
            raise RuntimeError("socket.end() threw")


@dataclass
class Harness:
    runtime: SessionRuntime
    store: SessionStore
    pending: PendingSteps
    sockets: LocalSocketController

    def socket(self, organization_phone_id: int, mode: str = "ok") -> TestSocket:
        socket = TestSocket(mode)
        self.sockets.register(organization_phone_id, socket)
        return socket


@asynccontextmanager
async def runtime_over(
    dsn: str | None,
    policy: PolicyConfig | None = None,
    *,
    state_dir: Path | None = None,
    socket_end_timeout: float = 2.0,
    database_step_timeout: float = 5.0,
    observers: Sequence[RuntimeObserver] = (),
    restore: bool = True,
    clock: Callable[[], datetime] = now,
    keys: KeyRemoval | None = None,
) -> AsyncIterator[Harness]:
    store: SessionStore
    store = await PostgresStore.connect(dsn, SchemaMapping()) if dsn else MemoryStore(clock)
    pending = PendingSteps(store, 100_000, Journal(state_dir) if state_dir else None)
    sockets = LocalSocketController()
    runtime = assemble(
        policy or PolicyConfig(),
        store,
        pending,
        sockets,
        observers,
        clock=clock,
        socket_end_timeout=socket_end_timeout,
        database_step_timeout=database_step_timeout,
        keys=keys,
    )
    await pending.start()
    if restore:
        await runtime.restore()
    try:
        yield Harness(runtime, store, pending, sockets)
    finally:
        await runtime.shutdown(grace_seconds=5)
        await pending.stop()
        await store.close()
