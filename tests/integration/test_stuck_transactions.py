"""No connection can hold the fleet: a session that holds a phone's row (or the breaker's lock) and never
finishes, as a replica cut off from PostgreSQL mid-transaction does, delays only that phone's events; they are
never dropped, `/readyz` says when they have waited too long, and the server ends a sidecar session left idle in a
transaction. The stuck session is a real second connection (asyncpg on its own); outcomes are read on another."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from sidecar.app import Extras
from sidecar.client import connection_update, decrypt_error
from sidecar.config import SchemaMapping
from sidecar.ports import StoreUnavailable
from sidecar.runtime import decision_queue
from sidecar.store.postgres import IDLE_IN_TRANSACTION_TIMEOUT, PostgresStore
from tests.pgbouncer import PgBouncer
from tests.seed import add_phone
from tests.server import Served, serving, sidecar_config
from tests.waiting import eventually

TOKEN = "operator-token"
COUNTERS = "wa_sidecar.session_counters"
WAITING = "whatsapp_sidecar_phones_waiting_on_locks"


async def post(served: Served, events: list[dict[str, Any]]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{served.base}/v1/events", json=events, headers=headers) as response:
            assert response.status == 202, await response.text()


async def readyz(served: Served) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{served.base}/readyz") as response:
        return response.status, await response.json()


async def bad_macs(db: asyncpg.Connection, phone_id: int) -> int | None:
    value: int | None = await db.fetchval(
        f"SELECT bad_mac_errors FROM {COUNTERS} WHERE organization_phone_id = $1", phone_id
    )
    return value


@asynccontextmanager
async def stuck_session(database: str, statement: str, *args: object) -> AsyncIterator[asyncpg.Connection]:
    """Another session that takes a lock and then does nothing, inside its transaction, until the block ends."""
    other = await asyncpg.connect(database)
    transaction = other.transaction()
    await transaction.start()
    await other.execute(statement, *args)
    try:
        yield other
    finally:
        await transaction.rollback()
        await other.close()


async def test_a_phone_whose_row_a_stuck_session_holds_waits_alone_and_is_decided_once_it_is_free(
    database: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decision_queue, "STALL_SECONDS", 1.0)
    locked, *others = [await add_phone(db, 1, f"7900111{index:04d}") for index in range(6)]
    registry = CollectorRegistry()
    async with serving(sidecar_config(database, api_token=TOKEN), extras=Extras(registry=registry)) as served:
        opens = [connection_update(1, p.organization_phone_id, p.phone_jid, "open") for p in (locked, *others)]
        await post(served, opens)  # every phone's row exists
        lock = f"SELECT 1 FROM {COUNTERS} WHERE organization_phone_id = $1 FOR UPDATE"
        async with stuck_session(database, lock, locked.organization_phone_id):
            started = time.monotonic()
            locked_error = decrypt_error(1, locked.organization_phone_id, locked.phone_jid, "Bad MAC")
            waiting = asyncio.create_task(post(served, [locked_error, locked_error]))  # answered within 2 s
            for _ in range(2):
                await post(served, [decrypt_error(1, p.organization_phone_id, p.phone_jid, "Bad MAC") for p in others])

            async def others_decided() -> bool:
                return all([await bad_macs(db, p.organization_phone_id) == 2 for p in others])

            await eventually(others_decided, what="the unrelated phones decided")
            print(f"unrelated phones decided {time.monotonic() - started:.3f} s after their events, one row locked")
            await waiting
            await eventually(lambda: registry.get_sample_value(WAITING) == 1, what="the locked phone shown waiting")
            assert await bad_macs(db, locked.organization_phone_id) == 0

            async def says_stalled() -> bool:
                status, body = await readyz(served)
                return status == 503 and "decisions stalled: 2 events of 1 phones" in body["reason"]

            await eventually(says_stalled, what="/readyz names the stall")
            _, body = await readyz(served)
            assert body["undecidedEvents"] == 2 and body["oldestUndecidedEventAgeSeconds"] > 1.0
        # The stuck session is gone (rolled back): the waiting events are decided, none dropped.

        async def locked_decided() -> bool:
            return await bad_macs(db, locked.organization_phone_id) == 2

        await eventually(locked_decided, what="the waiting events decided once the row is free")
        assert (await readyz(served))[0] == 200 and registry.get_sample_value(WAITING) == 0
        labels = {"kind": "decide_event", "reason": "other"}
        assert not registry.get_sample_value("whatsapp_sidecar_steps_failed_total", labels)


async def test_the_breakers_lock_held_by_a_stuck_session_holds_back_only_the_closes(
    database: str, db: asyncpg.Connection
) -> None:
    closing, counting = await add_phone(db, 1, "79001112233"), await add_phone(db, 1, "79004445566")
    registry = CollectorRegistry()
    async with serving(sidecar_config(database, api_token=TOKEN), extras=Extras(registry=registry)) as served:
        await post(
            served, [connection_update(1, p.organization_phone_id, p.phone_jid, "open") for p in (closing, counting)]
        )
        lock = "SELECT pg_advisory_xact_lock(hashtext($1))"
        async with stuck_session(database, lock, "wa-sidecar-breaker:wa_sidecar"):
            errors = [decrypt_error(1, closing.organization_phone_id, closing.phone_jid, "Bad MAC")] * 3
            await post(
                served, [*errors, decrypt_error(1, counting.organization_phone_id, counting.phone_jid, "Bad MAC")]
            )

            async def counted() -> bool:
                return await bad_macs(db, counting.organization_phone_id) == 1

            await eventually(counted, what="a phone below its limit decided")

            async def waiting_on_the_lock() -> bool:  # PostgreSQL's own view: a sidecar session queued for it
                waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                return bool(await db.fetchval(waiting))

            # The close first waits for the lock (a batch holding it elsewhere frees it within milliseconds), for a
            # bounded time: then it is parked and retried, and the other phones were not held up meanwhile.
            await eventually(waiting_on_the_lock, interval=0.005, what="the close queued for the breaker's lock")
            await eventually(lambda: registry.get_sample_value(WAITING) == 1, what="the close waits for the lock")
            assert await bad_macs(db, closing.organization_phone_id) == 2  # the first two decided, the third waits
            assert await db.fetchval("SELECT count(*) FROM wa_sidecar.closures") == 0

        async def closed_once() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM wa_sidecar.closures") == 1)

        await eventually(closed_once, what="the close admitted once the lock is free")
        phase = await db.fetchval(
            f"SELECT phase FROM {COUNTERS} WHERE organization_phone_id = $1", closing.organization_phone_id
        )
        assert phase == "closed"
        row = await db.fetchrow("SELECT reason, bad_mac_errors FROM wa_sidecar.closures")
        assert row is not None and row["reason"] == "bad_mac_limit" and row["bad_mac_errors"] == 3


@pytest.mark.parametrize("pooler", ["none", "transaction"])
async def test_a_sidecar_session_left_idle_in_a_transaction_is_ended_by_the_server(
    database: str, db: asyncpg.Connection, pooler: str
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    await db.execute(
        f"INSERT INTO {COUNTERS} (organization_phone_id, organization_id) VALUES ($1, 1)", phone.organization_phone_id
    )
    bouncer = PgBouncer() if pooler != "none" else None
    if bouncer is not None:
        await bouncer.start()
    try:
        url = bouncer.url(database) if bouncer is not None else database
        store = await PostgresStore.connect(url, SchemaMapping(), command_timeout=30.0, pooler=pooler)
        lock = f"SELECT 1 FROM {COUNTERS} WHERE organization_phone_id = $1 FOR UPDATE"
        free = f"SELECT 1 FROM {COUNTERS} WHERE organization_phone_id = $1 FOR UPDATE NOWAIT"
        try:
            with pytest.raises(StoreUnavailable):  # the connection the server closed
                async with store.transaction() as conn:
                    await conn.execute(lock, phone.organization_phone_id)
                    async with db.transaction():
                        with pytest.raises(asyncpg.LockNotAvailableError):
                            await db.execute(free, phone.organization_phone_id)  # held by the sidecar's session
                    # The client goes quiet mid-transaction (as one cut off from the server does).

                    async def row_free() -> bool:
                        try:
                            async with db.transaction():
                                await db.execute(free, phone.organization_phone_id)
                        except asyncpg.LockNotAvailableError:
                            return False
                        return True

                    seconds = float(IDLE_IN_TRANSACTION_TIMEOUT.removesuffix("s"))
                    await eventually(row_free, deadline_seconds=seconds + 10, what="the server ended the session")
                    await conn.execute("SELECT 1")  # the ended session fails its next statement
        finally:
            await store.close()
    finally:
        if bouncer is not None:
            await bouncer.remove()
