"""State that grows with the fleet's history is bounded: sessions holding nothing and closed markers expire
after --state-ttl, the loop detector forgets quiet phones, and history tables are pruned after --retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg

from sidecar.app import Extras
from sidecar.client import RuntimeClient, activity_event, connection_update, connection_update_event, decrypt_error
from sidecar.config import SchemaMapping
from sidecar.rules.safety import LoopConfig, LoopDetector
from sidecar.store.postgres import PostgresStore
from tests.server import serving, sidecar_config
from tests.waiting import eventually

TOKEN = "operator-token"
DAY = 86_400.0


def test_the_loop_detector_forgets_phones_quiet_for_a_window() -> None:
    detector = LoopDetector(LoopConfig(closes=3, window_seconds=60))
    for moment in (0.0, 10.0, 20.0):
        detector.on_close(1, moment, 428)
    detector.on_close(2, 100.0, 428)
    assert detector.expire(now=90.0) == 1 and detector.tracked == 1  # phone 1 quiet since 20 s, window 60 s
    assert detector.expire(now=159.0) == 0 and detector.tracked == 1
    assert detector.expire(now=161.0) == 1 and detector.tracked == 0


async def test_sessions_holding_nothing_and_closed_markers_expire_after_the_ttl(database: str) -> None:
    now = [datetime(2026, 11, 30, 12, 0, tzinfo=UTC)]
    config = sidecar_config(database, api_token=TOKEN, coordination="local", state_ttl=DAY)
    jid = "79001112233@s.whatsapp.net"
    async with (
        serving(config, extras=Extras(clock=lambda: now[0])) as served,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
    ):
        events = [
            connection_update(1, 1, jid, "close", status_code=428),  # a transient close: a session holding nothing
            connection_update(1, 2, jid, "open"),  # connected: kept
            decrypt_error(1, 3, jid, "Bad MAC"),  # holds a count: kept
        ]
        async with http.post(served.base + "/v1/events", json=events) as response:
            assert response.status == 202
        async with http.post(served.base + "/v1/events", json=[decrypt_error(1, 5, jid, "Bad MAC")] * 3) as response:
            assert response.status == 202  # phone 5 is closed: a closed marker
        runtime = served.components.runtime
        await runtime.settle()
        assert {s.organization_phone_id for s in runtime.sessions()} == {1, 2, 3}
        assert runtime.is_closed(5)
        assert runtime.expire_state() == []  # the first sweep notes since when phone 1 holds nothing
        now[0] += timedelta(seconds=DAY + 1)
        assert [phone.organization_phone_id for phone in runtime.expire_state()] == [1]
        assert {s.organization_phone_id for s in runtime.sessions()} == {2, 3}
        assert not runtime.is_closed(5) and runtime.closed_count == 0
        async with http.get(served.base + "/metrics") as response:
            text = await response.text()
        assert 'organization_phone_id="1"' not in text and 'organization_phone_id="3"' in text


async def test_restore_loads_closed_markers_only_within_the_ttl(database: str, db: asyncpg.Connection) -> None:
    insert = (
        "INSERT INTO wa_sidecar.session_counters (organization_phone_id, organization_id, closed_at, phase) "
        "VALUES ($1, 1, now() - make_interval(secs => $2), 'closed')"
    )
    await db.execute(insert, 10, 2 * DAY)
    await db.execute(insert, 11, 3600.0)
    config = sidecar_config(database, coordination="local", state_ttl=DAY)
    async with serving(config) as served:
        runtime = served.components.runtime
        assert runtime.is_closed(11) and not runtime.is_closed(10)
        assert runtime.closed_count == 1


async def test_retention_deletes_old_history_in_batches_and_keeps_the_rest(
    database: str, db: asyncpg.Connection
) -> None:
    old, recent = 40 * DAY, 3600.0
    for index, age in enumerate([old] * 5 + [recent] * 2):
        await db.execute(
            "INSERT INTO wa_sidecar.closures (closure_id, organization_id, organization_phone_id, reason, trigger, "
            "detail, bad_mac_errors, bad_decrypt_errors, socket, steps, started_at, duration_seconds) VALUES "
            "($1, 1, $2, 'bad_mac_limit', 'automatic', '', 3, 0, 'ended', '{}', now() - make_interval(secs => $3), 0)",
            f"c{index}",
            index,
            age,
        )
        await db.execute(
            "INSERT INTO wa_sidecar.decisions (decision_id, decision, decided_at, detail) "
            "VALUES ($1, 'breaker.tripped', now() - make_interval(secs => $2), '{}')",
            f"d{index}",
            age,
        )
        for status in ("delivered", "pending"):
            await db.execute(
                "INSERT INTO wa_sidecar.outbox (notification_id, event, organization_id, organization_phone_id, "
                "occurred_at, stats, details, status) VALUES ($1, 'session.unhealthy', 1, $2, "
                "now() - make_interval(secs => $3), '{}', '{}', $4)",
                f"n{index}{status}",
                index,
                age,
                status,
            )
        await db.execute(
            "INSERT INTO wa_sidecar.session_counters (organization_phone_id, organization_id, bad_mac_errors, "
            "updated_at) VALUES ($1, 1, $2, now() - make_interval(secs => $3))",
            100 + index,
            index % 2,  # even: no counts (idle, deletable once old); odd: a count (kept: it matters to the limit)
            age,
        )
    store = await PostgresStore.connect(database, SchemaMapping())
    try:
        deleted = await store.prune(30 * DAY, batch=2)
    finally:
        await store.close()
    assert deleted["closures"] == 5 and deleted["decisions"] == 5 and deleted["outbox"] == 5
    assert deleted["session_counters"] == 3  # indexes 0, 2, 4 of the old ones
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.closures") == 2
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.decisions") == 2
    statuses = [
        tuple(r) for r in await db.fetch("SELECT status, count(*) FROM wa_sidecar.outbox GROUP BY 1 ORDER BY 1")
    ]
    assert statuses == [("delivered", 2), ("pending", 7)]  # a pending notification is never deleted
    kept = await db.fetch("SELECT organization_phone_id FROM wa_sidecar.session_counters ORDER BY 1")
    assert [r[0] for r in kept] == [101, 103, 105, 106]


async def test_an_expired_session_releases_the_runtime_connections_claim(database: str) -> None:
    now = [datetime(2026, 11, 30, 12, 0, tzinfo=UTC)]
    config = sidecar_config(database, coordination="local", state_ttl=DAY)
    jid = "79001112233@s.whatsapp.net"
    async with (
        serving(config, extras=Extras(clock=lambda: now[0])) as served,
        RuntimeClient(served.ws_url) as client,
    ):
        await client.wait_connected()
        await client.send(connection_update(1, 1, jid, "open"))
        await client.send(connection_update(1, 1, jid, "close", status_code=428))  # and never opened again
        await client.flush()
        link, runtime = served.components.link, served.components.runtime
        assert link.owner_of(1) is not None
        runtime.expire_state()
        now[0] += timedelta(seconds=DAY + 1)
        link.forget([phone.organization_phone_id for phone in runtime.expire_state()])
        assert link.owner_of(1) is None and runtime.session(1) is None
        await client.send(connection_update(1, 1, jid, "open"))  # the runtime reconnects: claimed again
        await client.flush()
        assert link.owner_of(1) is not None


async def test_in_fleet_mode_an_open_then_a_close_leave_the_session_disconnected(database: str) -> None:
    """Fleet decisions are carried out after their transaction; a close received meanwhile must still win."""
    jid = "79001112233@s.whatsapp.net"
    async with serving(sidecar_config(database)) as served, RuntimeClient(served.ws_url) as client:
        await client.wait_connected()
        for phone_id in range(1, 51):
            await client.send(connection_update(1, phone_id, jid, "open"))
            await client.send(connection_update(1, phone_id, jid, "close", status_code=428))
        await client.flush()
        runtime = served.components.runtime

        def all_decided_and_disconnected() -> bool:
            sessions = list(runtime.sessions())
            return len(sessions) == 50 and not any(s.connected for s in sessions)

        await eventually(all_decided_and_disconnected, deadline_seconds=10, what="50 sessions, none connected")


async def test_the_liveness_watch_forgets_disconnected_sessions_without_traffic_after_the_ttl() -> None:
    now = [datetime(2026, 11, 30, 12, 0, tzinfo=UTC)]
    config = sidecar_config(None, state_ttl=DAY)
    jid = "79001112233@s.whatsapp.net"
    async with serving(config, extras=Extras(clock=lambda: now[0])) as served:
        runtime = served.components.runtime
        await runtime.apply(activity_event(1, 11, jid, now[0]))  # traffic, then its connection closes
        await runtime.apply(connection_update_event(1, 11, jid, "close", 428))
        await runtime.apply(connection_update_event(1, 12, jid, "open"))  # connected, no traffic yet: kept
        assert runtime.liveness.watched_count == 2
        runtime.expire_state()
        assert runtime.liveness.watched_count == 2, "not yet a day"
        now[0] += timedelta(seconds=DAY + 1)
        runtime.expire_state()
        assert runtime.liveness.state_of(11) is None and runtime.liveness.state_of(12) is not None
