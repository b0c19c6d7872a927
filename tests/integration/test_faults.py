"""Fault injection against real PostgreSQL: for each fault the sidecar keeps serving, logs it, counts it,
`/readyz` says so, and once the fault is removed it recovers with nothing accepted lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from sidecar.app import Extras
from sidecar.client import connection_update, decrypt_error
from sidecar.rules.policy import Counters
from sidecar.rules.records import ClosureRecord, PhoneRef
from sidecar.runtime.observer import RuntimeObserver
from sidecar.store.db_errors import Fault, classify
from sidecar.store.migrations import migrate
from tests.conftest import SEED_SCHEMA
from tests.pgcluster import ThrowawayPostgres
from tests.seed import add_phone
from tests.server import Served, serving, sidecar_config
from tests.waiting import eventually

TOKEN = "operator-token"


async def post_events(served: Served, events: list[dict[str, Any]]) -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(served.base + "/v1/events", json=events, headers=headers) as response,
    ):
        return response.status


async def readyz(served: Served) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(served.base + "/readyz") as response:
        return response.status, await response.json()


async def bad_macs_stored(dsn: str, organization_phone_id: int) -> int | None:
    db = await asyncpg.connect(dsn)
    try:
        value = await db.fetchval(
            "SELECT bad_mac_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1",
            organization_phone_id,
        )
        return None if value is None else int(value)
    finally:
        await db.close()


def local(dsn: str | None, **changes: Any) -> Any:
    """One replica, counters written through the pending-step queue (the queue these faults target)."""
    return sidecar_config(dsn, api_token=TOKEN, coordination="local", **changes)


async def test_a_read_only_database_after_a_failover_holds_the_steps_until_it_is_writable(
    seeded: str, cluster: ThrowawayPostgres
) -> None:
    admin = await asyncpg.connect(seeded)
    phone = await add_phone(admin, 1, "79001112233")
    registry = CollectorRegistry()
    async with serving(local(seeded), extras=Extras(registry=registry)) as served:
        await post_events(served, [decrypt_error(1, phone.organization_phone_id, phone.phone_jid, "Bad MAC")])
        await eventually(lambda: served.components.pending.depth == 0, what="first error written")
        # The "failover": the database turns read-only and every connection is dropped, as a promotion does.
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND datname = current_database()"
        )
        assert (
            await post_events(served, [decrypt_error(1, phone.organization_phone_id, phone.phone_jid, "Bad MAC")])
            == 202
        )

        async def says_read_only() -> bool:
            status, body = await readyz(served)
            return status == 503 and "read-only" in body["reason"]

        await eventually(says_read_only, what="/readyz names the read-only database")
        assert served.components.pending.failed_steps == 0
        assert registry.get_sample_value("whatsapp_sidecar_pending_step_age_seconds") > 0  # type: ignore[operator]
        # The primary is writable again: the held step is applied, nothing dropped.
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await eventually(lambda: served.components.pending.depth == 0, what="held step applied")
        assert (await readyz(served))[0] == 200
        assert (
            registry.get_sample_value(
                "whatsapp_sidecar_steps_failed_total", {"kind": "increment_counter", "reason": "other"}
            )
            is None
        )
    assert await bad_macs_stored(seeded, phone.organization_phone_id) == 2
    await admin.close()


class Exploding(RuntimeObserver):
    def counters_changed(self, phone: PhoneRef, counters: Counters) -> None:
        raise RuntimeError("observer bug")

    def closing(self, record: ClosureRecord) -> None:  # raised after the session was set to closing
        raise RuntimeError("observer bug in closing")


async def test_an_observer_that_raises_cannot_break_a_transition(
    database: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    registry = CollectorRegistry()
    extras = Extras(registry=registry, observers=[Exploding()])
    async with serving(local(database), extras=extras) as served:
        for _ in range(3):
            await post_events(served, [decrypt_error(1, phone.organization_phone_id, phone.phone_jid, "Bad MAC")])
        await served.components.runtime.settle()
        # The third error still closed the session: the close ran although an observer raised before it.
        await eventually(lambda: served.components.runtime.is_closed(phone.organization_phone_id), what="closed")
        assert registry.get_sample_value("whatsapp_sidecar_observer_failures_total", {"observer": "Exploding"}) >= 2  # type: ignore[operator]
        assert (await readyz(served))[0] == 200
    assert any("observer Exploding failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.closures") == 1


async def test_a_crashing_step_worker_is_restarted_and_reported(
    database: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    registry = CollectorRegistry()
    async with serving(local(database), extras=Extras(registry=registry)) as served:
        store = served.components.store
        real_apply = store.apply
        crashes = 0

        async def crashing(*args: Any, **kwargs: Any) -> Any:
            nonlocal crashes
            if crashes < 3:
                crashes += 1
                raise ZeroDivisionError("a bug in the worker")
            return await real_apply(*args, **kwargs)

        store.apply = crashing  # type: ignore[method-assign]
        await post_events(served, [decrypt_error(1, phone.organization_phone_id, phone.phone_jid, "Bad MAC")])
        await eventually(lambda: bool(served.components.supervisor.down), what="worker reported down")
        status, body = await readyz(served)
        assert status == 503 and "pending-steps" in body["tasksDown"], body
        await eventually(lambda: served.components.pending.depth == 0, what="restarted worker applied the step")
        await eventually(lambda: not served.components.supervisor.down, what="worker stable again")
        assert (await readyz(served))[0] == 200
        assert registry.get_sample_value("whatsapp_sidecar_task_failures_total", {"task": "pending-steps"}) == 3
    assert any("pending-steps failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert await bad_macs_stored(database, phone.organization_phone_id) == 1


async def slow_counter_writes(db: asyncpg.Connection, organization_phone_id: int) -> None:
    """Every write of this phone's counter row takes 2 s (a trigger): slower than the tests' 0.3 s timeout."""
    await db.execute(
        f"""CREATE FUNCTION slow_counter() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.organization_phone_id = {organization_phone_id} THEN PERFORM pg_sleep(2); END IF;
        RETURN NEW; END $$;
        CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON wa_sidecar.session_counters
        FOR EACH ROW EXECUTE FUNCTION slow_counter();"""
    )


async def test_a_statement_slower_than_the_timeout_is_retried_a_few_times_then_failed_alone(
    database: str, db: asyncpg.Connection
) -> None:
    slow, fine = await add_phone(db, 1, "79001112233"), await add_phone(db, 1, "79004445566")
    await slow_counter_writes(db, slow.organization_phone_id)
    registry = CollectorRegistry()
    async with serving(local(database, database_command_timeout=0.3), extras=Extras(registry=registry)) as served:
        events = [
            decrypt_error(1, fine.organization_phone_id, fine.phone_jid, "Bad MAC"),
            decrypt_error(1, slow.organization_phone_id, slow.phone_jid, "Bad MAC"),
            decrypt_error(1, fine.organization_phone_id, fine.phone_jid, "Bad MAC"),
        ]
        assert await post_events(served, events) == 202
        await eventually(lambda: served.components.pending.depth == 0, what="queue moved past the slow step")
        assert served.components.pending.failed_steps == 1
        labels = {"kind": "increment_counter", "reason": "timeout"}
        assert registry.get_sample_value("whatsapp_sidecar_steps_failed_total", labels) == 1
        assert (await readyz(served))[0] == 200  # slow is not an outage
    assert await bad_macs_stored(database, fine.organization_phone_id) == 2
    assert await bad_macs_stored(database, slow.organization_phone_id) is None


async def test_in_fleet_mode_a_slow_decision_waits_alone_and_is_decided_once_the_statement_is_fast_again(
    database: str, db: asyncpg.Connection
) -> None:
    slow, fine = await add_phone(db, 1, "79001112233"), await add_phone(db, 1, "79004445566")
    await slow_counter_writes(db, slow.organization_phone_id)
    registry = CollectorRegistry()
    config = sidecar_config(database, api_token=TOKEN, database_command_timeout=0.3)  # fleet mode: the default
    async with serving(config, extras=Extras(registry=registry)) as served:
        events = [
            decrypt_error(1, fine.organization_phone_id, fine.phone_jid, "Bad MAC"),
            decrypt_error(1, slow.organization_phone_id, slow.phone_jid, "Bad MAC"),
            decrypt_error(1, fine.organization_phone_id, fine.phone_jid, "Bad MAC"),
        ]
        assert await post_events(served, events) == 202

        async def fine_counted() -> bool:
            return await bad_macs_stored(database, fine.organization_phone_id) == 2

        await eventually(fine_counted, what="the others decided while the slow one waits")
        gauge = "whatsapp_sidecar_phones_waiting_on_locks"
        await eventually(lambda: registry.get_sample_value(gauge) == 1, what="the slow phone shown waiting")
        assert served.components.runtime.decider.backlog == 1
        await db.execute("DROP TRIGGER slow ON wa_sidecar.session_counters")  # the statement is fast again

        async def slow_counted() -> bool:
            return await bad_macs_stored(database, slow.organization_phone_id) == 1

        await eventually(slow_counted, what="the waiting event decided, not dropped")
        assert served.components.runtime.decider.backlog == 0 and registry.get_sample_value(gauge) == 0
        labels = {"kind": "decide_event", "reason": "timeout"}
        assert not registry.get_sample_value("whatsapp_sidecar_steps_failed_total", labels)
        assert (await readyz(served))[0] == 200
    assert await bad_macs_stored(database, fine.organization_phone_id) == 2


async def test_down_at_start_then_up_unmigrated_is_reported_until_migrated(
    cluster: ThrowawayPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.stop()
    async with serving(local(cluster.dsn), wait_restored=False) as served:
        status, body = await readyz(served)
        assert status == 503 and "store unreachable" in body["reason"]
        jid = "79001112233@s.whatsapp.net"
        assert (
            await post_events(served, [connection_update(1, 7, jid, "open"), decrypt_error(1, 7, jid, "Bad MAC")])
            == 202
        )
        cluster.start()
        admin = await asyncpg.connect(cluster.dsn)
        await admin.execute(SEED_SCHEMA)  # the backend's tables, but `wa-sidecar migrate` never ran

        async def says_unmigrated() -> bool:
            status, body = await readyz(served)
            return status == 503 and "schema not usable: the 'wa_sidecar' schema is at version 0" in body["reason"]

        await eventually(says_unmigrated, what="/readyz names the missing migration")
        assert served.components.pending.depth > 0 and served.components.pending.failed_steps == 0
        await migrate(admin, "wa_sidecar")
        await eventually(lambda: served.components.pending.depth == 0, deadline_seconds=30, what="steps applied")
        await eventually(lambda: served.components.restored.is_set(), what="restore finished")

        async def ready() -> bool:
            return (await readyz(served))[0] == 200

        await eventually(ready, what="ready once migrated")
        await admin.close()
    assert any("schema is at version 0" in r.getMessage() for r in caplog.records)
    assert await bad_macs_stored(cluster.dsn, 7) == 1


async def test_a_table_dropped_while_serving_is_a_missing_schema_not_lost_steps(
    database: str, db: asyncpg.Connection
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    async with serving(local(database)) as served:
        await db.execute("ALTER TABLE wa_sidecar.session_counters RENAME TO session_counters_away")
        await post_events(served, [decrypt_error(1, phone.organization_phone_id, phone.phone_jid, "Bad MAC")])
        await eventually(lambda: served.components.pending.unavailable_reason is not None, what="noticed")
        status, body = await readyz(served)
        assert status == 503 and "wa-sidecar migrate" in body["reason"], body
        await db.execute("ALTER TABLE wa_sidecar.session_counters_away RENAME TO session_counters")
        await eventually(lambda: served.components.pending.depth == 0, what="applied once the table is back")
        assert served.components.pending.failed_steps == 0
    assert await bad_macs_stored(database, phone.organization_phone_id) == 1


@pytest.mark.parametrize(
    "journal",
    [
        "format\t99\n1\t{}\n",
        'format\t1\n1\t{"not a step": true}\n2\t{"not a step": true}\n',
    ],
    ids=["newer-format", "corrupt-entry"],
)
def test_an_unreadable_journal_is_refused_with_a_clear_error_and_kept(
    database: str, tmp_path: Path, journal: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "pending-steps.jsonl").write_text(journal)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--database-url", database, "--state-dir", str(state),
         "--coordination", "local", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "pending-steps.jsonl" in result.stderr and ("format" in result.stderr or "line 2" in result.stderr)
    assert "Traceback" not in result.stderr
    assert (state / "pending-steps.jsonl").read_text() == journal  # left as it was


def test_every_postgres_error_is_read_as_one_of_four_faults() -> None:
    e = asyncpg.exceptions
    cases: dict[Fault, list[BaseException]] = {
        Fault.UNAVAILABLE: [
            ConnectionRefusedError(), e.AdminShutdownError("x"), e.CannotConnectNowError("x"),
            e.TooManyConnectionsError("x"), e.ReadOnlySQLTransactionError("x"), e.UndefinedTableError("x"),
            e.InvalidSchemaNameError("x"), e.UndefinedColumnError("x"), e.InvalidCatalogNameError("x"),
            e.InvalidPasswordError("x"), asyncpg.InterfaceError("x"),
        ],
        Fault.SLOW: [TimeoutError(), e.QueryCanceledError("x")],
        Fault.CONFLICT: [e.DeadlockDetectedError("x"), e.SerializationError("x")],
        Fault.OWN: [e.UniqueViolationError("x"), e.RaiseError("x"), e.NumericValueOutOfRangeError("x")],
    }  # fmt: skip
    assert {fault: [classify(error) for error in errors] for fault, errors in cases.items()} == {
        fault: [fault] * len(errors) for fault, errors in cases.items()
    }
