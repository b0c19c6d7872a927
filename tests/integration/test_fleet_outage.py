"""Fleet mode fails closed: while PostgreSQL is away no replica decides, and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from sidecar.client import RuntimeClient, connection_update, decrypt_error
from sidecar.store.journal import JOURNAL_FILE
from tests.pgcluster import ThrowawayPostgres
from tests.replicas import Replica, replicas, settled
from tests.seed import add_phone, keys_of
from tests.waiting import eventually

OUTAGE_SECONDS = 30.0
BAD = BAD_DECRYPT = "error:1C800064:Provider routines::bad decrypt"


async def closures(db: asyncpg.Connection) -> dict[int, int]:
    rows = await db.fetch("SELECT organization_phone_id, count(*) FROM wa_sidecar.closures GROUP BY 1")
    return {row["organization_phone_id"]: row["count"] for row in rows}


async def not_ready(replica: Replica) -> bool:
    status, body = await replica.request("GET", "/readyz")
    return status == 503 and "unreachable" in body["reason"]


async def test_postgres_away_for_30_seconds_no_close_meanwhile_each_close_once_after_no_error_lost(
    cluster: ThrowawayPostgres, seeded: str, tmp_path: Path
) -> None:
    db = await asyncpg.connect(seeded)
    closing = [await add_phone(db, 1, f"7900100{index:04d}", keys=("creds", "pre-key-1")) for index in range(6)]
    counting = [await add_phone(db, 2, f"7900200{index:04d}", keys=("creds",)) for index in range(6)]
    await db.close()
    async with replicas(2, seeded, tmp_path) as fleet:
        opens = [connection_update(p.organization_id, p.organization_phone_id, p.phone_jid, "open")
                 for p in closing + counting]  # fmt: skip
        await fleet[0].events(opens)
        cluster.stop()
        stopped = time.monotonic()
        round_ = 0
        while time.monotonic() - stopped < OUTAGE_SECONDS:  # errors keep arriving, spread over both replicas
            for index, phone in enumerate(closing):  # a Bad MAC every round: the 3rd reaches the limit
                event = decrypt_error(phone.organization_id, phone.organization_phone_id, phone.phone_jid, "Bad MAC")
                await fleet[(round_ + index) % 2].events([event])
            for index, phone in enumerate(counting):  # two bad decrypts each, below the limit of 5
                if round_ < 2:
                    event = decrypt_error(phone.organization_id, phone.organization_phone_id, phone.phone_jid, BAD)
                    await fleet[(round_ + index + 1) % 2].events([event])
            round_ += 1
            for replica in fleet:
                assert await not_ready(replica)
                status, body = await replica.request("GET", "/v1/sessions?state=closing")
                assert status == 200 and body["sessions"] == [], "no close while the database is away"
            await asyncio.sleep(1.0)  # the pace of arriving errors, not a wait for an outcome
        assert round_ >= 3
        for replica in fleet:  # the backlog is visible: gauges (the stock parser) and /readyz agree
            undecided, age = await backlog(replica)
            status, ready = await replica.request("GET", "/readyz")
            assert status == 503 and ready["undecidedEvents"] > 0 and undecided == ready["undecidedEvents"], ready
            assert age >= OUTAGE_SECONDS / 2 and ready["oldestUndecidedEventAgeSeconds"] >= OUTAGE_SECONDS / 2
        cluster.start()
        db = await asyncpg.connect(seeded)
        try:
            await eventually(lambda: _all_closed(db, closing), deadline_seconds=60, what="every phone at its limit")
            await eventually(lambda: _drained(fleet), what="the backlog decided on every replica")
            await eventually(lambda: settled(fleet), what="no close in flight")
            assert await closures(db) == {phone.organization_phone_id: 1 for phone in closing}
            at_close = await db.fetch("SELECT bad_mac_errors FROM wa_sidecar.closures")
            assert [row["bad_mac_errors"] for row in at_close] == [3] * len(closing)
            for phone in closing:
                assert await keys_of(db, phone) == set()
            for phone in counting:
                status, stats = await fleet[0].request("GET", f"/v1/sessions/{phone.organization_phone_id}/stats")
                assert status == 200 and stats["badDecryptErrors"] == 2, stats
                assert await keys_of(db, phone) == {"creds"}  # app-state keys only (none here) were healed
        finally:
            await db.close()


async def backlog(replica: Replica) -> tuple[float, float]:
    """whatsapp_sidecar_undecided_events and ..._oldest_undecided_event_age_seconds, as Prometheus reads them."""
    async with aiohttp.ClientSession() as http, http.get(replica.base + "/metrics") as response:
        text = await response.text()
    values = {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}
    return values["whatsapp_sidecar_undecided_events"], values["whatsapp_sidecar_oldest_undecided_event_age_seconds"]


async def _drained(fleet: Sequence[Replica]) -> bool:
    return all([await backlog(replica) == (0.0, 0.0) for replica in fleet])


async def _all_closed(db: asyncpg.Connection, phones: Sequence[object]) -> bool:
    return len(await closures(db)) == len(phones)


async def test_a_replica_started_while_postgres_is_away_counts_each_error_once(
    cluster: ThrowawayPostgres, seeded: str, tmp_path: Path
) -> None:
    db = await asyncpg.connect(seeded)
    phone = await add_phone(db, 1, "79001112233")
    await db.close()
    pid, jid = phone.organization_phone_id, phone.phone_jid
    cluster.stop()
    replica = Replica("replica-a", seeded, tmp_path, ["--state-dir", str(tmp_path / "state")])
    await replica.start(ready=False)
    try:
        await eventually(lambda: _answers(replica), what="serving while the database is away")
        assert await not_ready(replica)
        await replica.events([decrypt_error(1, pid, jid, BAD_DECRYPT), decrypt_error(1, pid, jid, BAD_DECRYPT)])
        status, answer = await replica.request("GET", f"/v1/sessions/{pid}/stats")
        assert status == 503 and "unreachable" in answer["error"]
        cluster.start()
        await eventually(lambda: _stats_are(replica, pid, 2), what="the two errors decided")
        await eventually(lambda: settled([replica]), what="heals done")
        db = await asyncpg.connect(seeded)
        try:
            stored = "SELECT bad_decrypt_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1"
            assert await db.fetchval(stored, pid) == 2
        finally:
            await db.close()
        await replica.events([decrypt_error(1, pid, jid, BAD_DECRYPT)])
        assert await _stats_are(replica, pid, 3)
    finally:
        await replica.stop()


async def _answers(replica: Replica) -> bool:
    try:
        status, _ = await replica.request("GET", "/healthz")
    except OSError:
        return False
    return status == 200


async def _stats_are(replica: Replica, phone_id: int, bad_decrypt: int) -> bool:
    status, stats = await replica.request("GET", f"/v1/sessions/{phone_id}/stats")
    return status == 200 and stats["badDecryptErrors"] == bad_decrypt


async def test_sigkill_with_journaled_steps_then_restart_closes_nothing_twice(
    cluster: ThrowawayPostgres, seeded: str, tmp_path: Path
) -> None:
    db = await asyncpg.connect(seeded)
    closed, counted, closing = [await add_phone(db, 1, f"790011122{index}3") for index in range(3)]
    await db.close()
    state = tmp_path / "state"
    replica = Replica("replica-a", seeded, tmp_path, ["--state-dir", str(state), "--socket-end-timeout", "2"])
    received = asyncio.Event()

    async def slow_end(command: dict[str, Any]) -> None:
        received.set()
        await asyncio.Event().wait()  # never acknowledged: the close goes on after the socket-end timeout

    await replica.start()
    try:
        url = replica.base.replace("http://", "ws://") + "/v1/runtime"
        async with RuntimeClient(url, on_session_end=slow_end, reconnect_initial=5) as runtime:
            for phone in (closed, counted, closing):
                await runtime.send(connection_update(1, phone.organization_phone_id, phone.phone_jid, "open"))
            for _ in range(3):
                await runtime.send(decrypt_error(1, closed.organization_phone_id, closed.phone_jid, "Bad MAC"))
            await runtime.send(decrypt_error(1, counted.organization_phone_id, counted.phone_jid, BAD_DECRYPT))
            await runtime.send(decrypt_error(1, counted.organization_phone_id, counted.phone_jid, BAD_DECRYPT))
            db = await asyncpg.connect(seeded)
            await eventually(lambda: _closure_of(db, closed.organization_phone_id), what="the first close recorded")
            await db.close()
            received.clear()
            for _ in range(3):
                await runtime.send(decrypt_error(1, closing.organization_phone_id, closing.phone_jid, "Bad MAC"))
            await asyncio.wait_for(received.wait(), 20)  # claimed in the database; the socket end waits
            cluster.stop()
            await eventually(
                lambda: _journaled_logout(state, closing.organization_phone_id),
                what="the close's database half journaled",
            )
            replica.kill()
            await replica.wait_exited()
        cluster.start()
        await replica.start()
        db = await asyncpg.connect(seeded)
        try:
            await eventually(lambda: _closure_of(db, closing.organization_phone_id), what="the journaled close")
            await eventually(lambda: settled([replica]), what="replay done")
            assert await closures(db) == {closed.organization_phone_id: 1, closing.organization_phone_id: 1}
            assert await keys_of(db, closing) == set()
            stored = "SELECT bad_decrypt_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1"
            status, stats = await replica.request("GET", f"/v1/sessions/{counted.organization_phone_id}/stats")
            in_database = await db.fetchval(stored, counted.organization_phone_id)
            assert status == 200 and stats["badDecryptErrors"] == in_database == 2
        finally:
            await db.close()
    finally:
        await replica.stop()


async def _closure_of(db: asyncpg.Connection, phone_id: int) -> bool:
    count = await db.fetchval("SELECT count(*) FROM wa_sidecar.closures WHERE organization_phone_id = $1", phone_id)
    return bool(count)


def _journaled_logout(state: Path, phone_id: int) -> bool:
    """A logout of this phone in the journal (applied entries stay until the file is compacted)."""
    journal = state / JOURNAL_FILE
    return journal.exists() and any(
        '"logout"' in line and f'"organizationPhoneId": {phone_id},' in line
        for line in journal.read_text().splitlines()
    )


async def test_events_waiting_for_postgres_survive_a_sigkill_and_are_decided_once(
    cluster: ThrowawayPostgres, seeded: str, tmp_path: Path
) -> None:
    db = await asyncpg.connect(seeded)
    phone = await add_phone(db, 1, "79001112299")
    await db.close()
    pid, jid = phone.organization_phone_id, phone.phone_jid
    replica = Replica("replica-a", seeded, tmp_path, ["--state-dir", str(tmp_path / "state")])
    await replica.start()
    try:
        await replica.events([decrypt_error(1, pid, jid, BAD_DECRYPT)])  # decided at once: 1
        cluster.stop()
        await replica.events([decrypt_error(1, pid, jid, BAD_DECRYPT), decrypt_error(1, pid, jid, BAD_DECRYPT)])
        assert await not_ready(replica)
        replica.kill()  # two accepted events not decided yet
        await replica.wait_exited()
        cluster.start()
        await replica.start()
        await eventually(lambda: _stats_are(replica, pid, 3), what="the journaled events decided")
        await eventually(lambda: settled([replica]), what="heals done")
        await replica.stop()  # a clean stop, then a start: nothing is decided twice
        await replica.start()
        assert await _stats_are(replica, pid, 3)
        assert "deciding 2 events accepted and not decided before the last stop" in replica.log()
    finally:
        await replica.stop()
