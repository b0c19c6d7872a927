"""Leases per replica (issue 30): real `wa-sidecar serve` processes on real PostgreSQL. An idle replica renews one
row, not one per phone (read in pg_stat_user_tables); a frame of 500 claims is one statement (pg_stat_statements on
a cluster of the test's own, directly and through PgBouncer in transaction mode); a stuck replica's phones are
taken over with the next generation, and what was addressed to it is refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect

from sidecar.client import RuntimeClient, connection_update
from tests.conftest import SEED_SCHEMA
from tests.pgbouncer import PgBouncer
from tests.pgcluster import ThrowawayPostgres
from tests.replicas import Replica, replicas
from tests.waiting import eventually


def ws_url(replica: Replica) -> str:
    return replica.base.replace("http://", "ws://") + "/v1/runtime"


def opens(phones: range) -> list[dict[str, Any]]:
    return [connection_update(1, phone, f"7900{phone:07d}@s.whatsapp.net", "open") for phone in phones]


async def table_writes(db: asyncpg.Connection, table: str) -> int:
    row = await db.fetchrow(
        "SELECT n_tup_ins + n_tup_upd + n_tup_del AS writes FROM pg_stat_user_tables "
        "WHERE schemaname = 'wa_sidecar' AND relname = $1",
        table,
    )
    return int(row["writes"]) if row is not None else 0


async def owners(db: asyncpg.Connection) -> dict[int, tuple[str, int]]:
    rows = await db.fetch("SELECT organization_phone_id, instance, generation FROM wa_sidecar.socket_owners")
    return {row[0]: (row[1], row[2]) for row in rows}


async def test_an_idle_replica_renews_one_row_and_keeps_every_phone(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phones = range(1, 201)
    async with replicas(1, database, tmp_path) as (replica,), RuntimeClient(ws_url(replica)) as runtime:
        await runtime.wait_connected()
        for event in opens(phones):
            await runtime.send(event)
        await eventually(lambda: _owned(db, len(phones)), what="every phone owned")
        # The claims' own writes, once PostgreSQL's statistics have them (backends flush them within seconds).
        await eventually(lambda: _grew(db, "socket_owners", len(phones)), what="the claims counted")
        before_owners = await table_writes(db, "socket_owners")
        before_leases = await table_writes(db, "replica_leases")
        # Two heartbeats counted by PostgreSQL itself (their stats flushed with anything else those backends did).
        await eventually(
            lambda: _grew(db, "replica_leases", before_leases + 2), deadline_seconds=40, what="two heartbeats"
        )
        assert await table_writes(db, "socket_owners") == before_owners, "no per-phone write while idle"
        held = await owners(db)
        assert len(held) == len(phones) and {instance for instance, _ in held.values()} == {
            await db.fetchval("SELECT instance FROM wa_sidecar.replica_leases")
        }
        live = await db.fetchval("SELECT sessions FROM wa_sidecar.replica_leases WHERE lease_until >= now()")
        assert live == len(phones), "the heartbeat says how many sessions it holds (the breaker's denominator)"
        # Past the old per-phone lease time, the phones are still this replica's: a close reaches the socket.
        status, answer = await replica.request("POST", "/v1/sessions/7/close", {"reason": "Maintenance restart"})
        assert status == 200 and answer["socket"] == "ended", answer


async def _owned(db: asyncpg.Connection, count: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM wa_sidecar.socket_owners")) == count


async def _grew(db: asyncpg.Connection, table: str, at_least: int) -> bool:
    return await table_writes(db, table) >= at_least


@pytest.fixture
async def counted_cluster() -> AsyncIterator[ThrowawayPostgres]:
    """A cluster of the test's own with pg_stat_statements loaded, the seed schema in database `postgres`."""
    cluster = ThrowawayPostgres()
    await asyncio.to_thread(cluster.init)
    await asyncio.to_thread(cluster.start, "-c shared_preload_libraries=pg_stat_statements")
    try:
        connection = await asyncpg.connect(cluster.dsn)
        try:
            await connection.execute(SEED_SCHEMA)
            await connection.execute("CREATE EXTENSION pg_stat_statements")
        finally:
            await connection.close()
        yield cluster
    finally:
        await asyncio.to_thread(cluster.destroy)


@pytest.mark.parametrize("pooler", ["none", "transaction"])
async def test_a_frame_of_500_claims_is_one_statement(
    counted_cluster: ThrowawayPostgres, tmp_path: Path, pooler: str
) -> None:
    bouncer = PgBouncer("transaction", backend_port=counted_cluster.port) if pooler == "transaction" else None
    if bouncer is not None:
        await bouncer.start()
    url = bouncer.url(counted_cluster.dsn) if bouncer is not None else counted_cluster.dsn
    migrate = await asyncio.create_subprocess_exec(
        *Replica("m", url, tmp_path)._argv[:3], "migrate", "--database-url", url
    )
    assert await migrate.wait() == 0
    db = await asyncpg.connect(counted_cluster.dsn)
    try:
        replica = Replica("replica-a", url, tmp_path, ["--database-pooler", pooler])
        await replica.start()
        try:
            async with connect(ws_url(replica)) as runtime:
                await db.execute("SELECT pg_stat_statements_reset()")
                await runtime.send(json.dumps(opens(range(1, 501))))  # one frame
                await eventually(lambda: _owned(db, 500), what="500 phones owned")
                rows = await db.fetch(
                    "SELECT calls, rows FROM pg_stat_statements WHERE query LIKE '%INSERT INTO%socket_owners%'"
                )
        finally:
            await replica.stop()
    finally:
        await db.close()
        if bouncer is not None:
            await bouncer.remove()
    assert [(row["calls"], row["rows"]) for row in rows] == [(1, 500)], "one claim statement for the frame"


async def test_a_stuck_replicas_phones_are_taken_over_with_the_next_generation_and_its_commands_refused(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phones = range(1, 21)
    async with replicas(2, database, tmp_path) as (a, b):
        async with connect(ws_url(a)) as first:
            await first.send(json.dumps(opens(phones)))
            await eventually(lambda: _owned(db, len(phones)), what="a holds every phone")
            before = await owners(db)
            a_instance = next(iter(before.values()))[0]
            assert a_instance.startswith("replica-a/")
            a.pause()  # stuck past its lease: its runtime moves to b
            try:
                await eventually(lambda: _lease_ended(db, a_instance), deadline_seconds=40, what="a's lease ended")
                async with connect(ws_url(b)) as moved:
                    await moved.send(json.dumps(opens(phones)))
                    await eventually(lambda: _all_held_by(db, "replica-b/"), what="b took every phone over")
                after = await owners(db)
                assert all(after[phone][1] == before[phone][1] + 1 for phone in phones), "the next generation"
                # A command addressed to a while it was stuck (a replica with a stale view routed it): refused.
                body = json.dumps({"type": "session.restart", "reason": "test", "detail": "late"})
                await db.execute(
                    "INSERT INTO wa_sidecar.socket_commands (command_id, organization_phone_id, instance, body) "
                    "VALUES ('late-1', 3, $1, $2::jsonb)",
                    a_instance,
                    body,
                )
            finally:
                a.pause(False)
            await eventually(lambda: _refused(db, "late-1"), what="a refused the late command once it woke")
            conflicts = await db.fetchval("SELECT count(*) FROM wa_sidecar.decisions WHERE decision LIKE '%conflict%'")
            assert conflicts == 0, "a takeover after the lease ended is no credentials conflict"


async def _lease_ended(db: asyncpg.Connection, instance: str) -> bool:
    return bool(
        await db.fetchval("SELECT lease_until < now() FROM wa_sidecar.replica_leases WHERE instance = $1", instance)
    )


async def _all_held_by(db: asyncpg.Connection, prefix: str) -> bool:
    held = await owners(db)
    return bool(held) and all(instance.startswith(prefix) for instance, _ in held.values())


async def _refused(db: asyncpg.Connection, command_id: str) -> bool:
    row = await db.fetchrow("SELECT status, error FROM wa_sidecar.socket_commands WHERE command_id = $1", command_id)
    return row is not None and row["status"] == "unreachable" and str(row["error"]).startswith("fenced")
