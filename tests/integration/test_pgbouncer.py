"""Fleet mode behind Debian's PgBouncer in transaction mode (`--database-pooler transaction`): migrate, decide,
route an operator's close between replicas and survive a PgBouncer restart, with outcomes read by psql's
equivalent on a direct connection (asyncpg to PostgreSQL itself, not through the pooler)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg

from sidecar.client import RuntimeClient, connection_update, decrypt_error
from tests.integration.test_fleet import Ends, closures_of, ws_url
from tests.pgbouncer import PgBouncer
from tests.replicas import Replica, replicas, settled
from tests.seed import add_phone, keys_of, phone_row
from tests.waiting import eventually

POOLER = ["--database-pooler", "transaction"]
BAD_MAC = "Bad MAC"


async def run(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")


async def test_a_fleet_behind_pgbouncer_in_transaction_mode_decides_every_phone_exactly(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    bouncer = PgBouncer()
    await bouncer.start()
    try:
        url = bouncer.url(database)
        code, output = await run(sys.executable, "-m", "sidecar", "migrate", "--database-url", url, *POOLER)
        assert code == 0, output
        phones = [await add_phone(db, 1, f"7900111{index:04d}") for index in range(20)]
        async with replicas(2, url, tmp_path, POOLER) as fleet:
            for phone in phones:
                await fleet[0].events([connection_update(1, phone.organization_phone_id, phone.phone_jid, "open")])
            # Even phones get three Bad MACs (the limit), odd ones two; the errors alternate between the replicas.
            for round_ in range(3):
                for index, phone in enumerate(phones):
                    if round_ < 2 or index % 2 == 0:
                        error = decrypt_error(1, phone.organization_phone_id, phone.phone_jid, BAD_MAC)
                        await fleet[(index + round_) % 2].events([error])
            at_limit = [phone.organization_phone_id for phone in phones[::2]]
            await eventually(lambda: _all_closed(db, at_limit), what="every phone at the limit closed")
            await eventually(lambda: settled(fleet), what="no close in flight")
            for replica in fleet:
                status, ready = await replica.request("GET", "/readyz")
                assert status == 200 and ready["ready"] is True, ready
                assert "could not be decided" not in replica.log()
                assert "Traceback" not in replica.log(), replica.log()[-3000:]
        for index, phone in enumerate(phones):
            pid = phone.organization_phone_id
            if index % 2 == 0:
                [closure] = await closures_of(db, pid)
                assert closure["bad_mac_errors"] == 3 and (await phone_row(db, phone))["status"] == "logged_out"
                assert await keys_of(db, phone) == set()
            else:
                counted = await db.fetchval(
                    "SELECT bad_mac_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", pid
                )
                assert counted == 2 and await closures_of(db, pid) == []
    finally:
        await bouncer.remove()


async def test_behind_pgbouncer_an_operator_close_is_routed_and_a_pgbouncer_restart_is_survived(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    bouncer = PgBouncer()
    await bouncer.start()
    phone, later = await add_phone(db, 1, "79001112233"), await add_phone(db, 1, "79001112244")
    ends = Ends()
    try:
        async with (
            replicas(2, bouncer.url(database), tmp_path, POOLER) as (a, b),
            RuntimeClient(ws_url(a), on_session_end=ends) as runtime,
        ):
            await runtime.send(connection_update(1, phone.organization_phone_id, phone.phone_jid, "open"))
            await runtime.flush()
            await eventually(lambda: _leased(db, phone.organization_phone_id), what="replica a holds the lease")
            path = f"/v1/sessions/{phone.organization_phone_id}/close"
            status, answer = await b.request("POST", path, {"reason": "Maintenance restart"})
            assert status == 200 and answer["socket"] == "ended", answer  # delivered through a, polled
            assert [command["reason"] for command in ends.commands] == ["forced"]
            await bouncer.stop()  # PgBouncer goes away and comes back on the same port
            await bouncer.start()
            pid, jid = later.organization_phone_id, later.phone_jid
            await b.events([connection_update(1, pid, jid, "open")] + [decrypt_error(1, pid, jid, BAD_MAC)] * 3)
            await eventually(lambda: _closed(db, pid), what="decided after PgBouncer's restart")
            # Both ready again, the idle one too (its settings watch saw PostgreSQL back; no event had to).
            await eventually(lambda: _ready([a, b]), what="both replicas ready after PgBouncer's restart")
            await eventually(lambda: settled([a, b]), what="no close in flight")
        assert len(await closures_of(db, phone.organization_phone_id)) == 1
        [closure] = await closures_of(db, later.organization_phone_id)
        assert closure["reason"] == "bad_mac_limit" and closure["bad_mac_errors"] == 3
    finally:
        await bouncer.remove()


async def _ready(fleet: list[Replica]) -> bool:
    return all([(await replica.request("GET", "/readyz"))[0] == 200 for replica in fleet])


async def _all_closed(db: asyncpg.Connection, phone_ids: list[int]) -> bool:
    closed = await db.fetchval(
        "SELECT count(DISTINCT organization_phone_id) FROM wa_sidecar.closures WHERE organization_phone_id = ANY($1)",
        phone_ids,
    )
    return bool(closed == len(phone_ids))


async def _closed(db: asyncpg.Connection, phone_id: int) -> bool:
    return bool(await closures_of(db, phone_id))


async def _leased(db: asyncpg.Connection, phone_id: int) -> bool:
    holder = await db.fetchval(
        "SELECT o.instance FROM wa_sidecar.socket_owners AS o JOIN wa_sidecar.replica_leases AS r USING (instance) "
        "WHERE o.organization_phone_id = $1 AND r.lease_until >= now()",
        phone_id,
    )
    return isinstance(holder, str) and holder.startswith("replica-a/")


async def test_without_the_flag_a_replica_behind_a_transaction_pooler_stops_with_a_message_naming_it(
    database: str, tmp_path: Path
) -> None:
    """The finding as operators met it (a raw traceback, a crash loop), now a clear message and exit 2: PgBouncer
    refuses the session timeouts a direct connection starts with (and, were they accepted, one server connection
    makes the prepared-statement clash certain: `migrate` leaves asyncpg's first named statement on it)."""
    bouncer = PgBouncer(pool_size=1)
    await bouncer.start()
    try:
        url = bouncer.url(database)
        code, output = await run(sys.executable, "-m", "sidecar", "migrate", "--database-url", url)
        assert code == 0, output
        code, output = await run(
            sys.executable, "-m", "sidecar", "serve", "--listen", "127.0.0.1:0", "--database-url", url
        )
        assert code == 2, output
        assert "--database-pooler transaction" in output and "Traceback" not in output, output
    finally:
        await bouncer.remove()
