"""Fleet mode: several real `wa-sidecar serve` processes on one PostgreSQL database act as one sidecar."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from sidecar.client import RuntimeClient, connection_update, decrypt_error
from tests.replicas import Replica, replicas, settled
from tests.seed import add_phone, keys_of, phone_row
from tests.waiting import eventually

BAD_MAC = "Bad MAC"


async def closures_of(db: asyncpg.Connection, phone_id: int) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM wa_sidecar.closures WHERE organization_phone_id = $1", phone_id))


async def closure_count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM wa_sidecar.closures"))


async def test_errors_spread_round_robin_close_the_phone_exactly_once(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with replicas(3, database, tmp_path) as fleet:
        await fleet[0].events([connection_update(1, pid, jid, "open")])
        for index in range(2):  # 1 error to a, 1 to b: no replica alone has seen two
            await fleet[index].events([decrypt_error(1, pid, jid, BAD_MAC)])
        status, stats = await fleet[2].request("GET", f"/v1/sessions/{pid}/stats")
        assert status == 200 and stats["badMacErrors"] == 2 and stats["isHealthy"] is False
        await fleet[2].events([decrypt_error(1, pid, jid, BAD_MAC)])  # the third, on c: the limit
        await eventually(lambda: _closed(db, pid), what="the close recorded")
        # More errors on every replica after the close, and an operator close through another one.
        for replica in fleet:
            await replica.events([decrypt_error(1, pid, jid, BAD_MAC)])
        status, answer = await fleet[1].request("POST", f"/v1/sessions/{pid}/close", {"reason": "Maintenance"})
        assert status == 200 and answer["alreadyClosed"] is True
        await eventually(lambda: settled(fleet), what="no close in flight anywhere")
    [closure] = await closures_of(db, pid)
    assert closure["reason"] == "bad_mac_limit" and closure["bad_mac_errors"] == 3
    assert await keys_of(db, phone) == set()
    assert (await phone_row(db, phone))["status"] == "logged_out"


async def test_two_replicas_never_lose_or_double_an_increment(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Concurrent errors on two replicas, at the real limit (5 Bad Decrypts): four leave the phone open with
    exactly four counted everywhere; the fifth closes it once, recorded with five."""
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    bad_decrypt = decrypt_error(1, pid, jid, "error:1C800064:Provider routines::bad decrypt", source="app-state")
    async with replicas(2, database, tmp_path) as fleet:
        await fleet[0].events([connection_update(1, pid, jid, "open")])
        await asyncio.gather(*(fleet[index % 2].events([bad_decrypt]) for index in range(4)))
        for replica in fleet:
            status, stats = await replica.request("GET", f"/v1/sessions/{pid}/stats")
            assert status == 200 and stats["badDecryptErrors"] == 4 and stats["isHealthy"] is False
        stored = await db.fetchval(
            "SELECT bad_decrypt_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", pid
        )
        assert stored == 4 and await closure_count(db) == 0
        await fleet[1].events([bad_decrypt])
        await eventually(lambda: _closed(db, pid), what="the close recorded")
        await eventually(lambda: settled(fleet), what="no close in flight anywhere")
    [closure] = await closures_of(db, pid)
    assert closure["reason"] == "bad_decrypt_limit" and closure["bad_decrypt_errors"] == 5


async def _closed(db: asyncpg.Connection, phone_id: int) -> bool:
    return len(await closures_of(db, phone_id)) > 0


async def test_the_breaker_is_the_fleets_and_survives_a_sigkill(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phones = [await add_phone(db, 1 + index % 4, f"7900{index:07d}", keys=("creds",)) for index in range(200)]
    extra = ["--breaker-max-closes", "20", "--breaker-max-share", "0.1"]
    async with replicas(3, database, tmp_path, extra) as fleet:
        opens = [connection_update(p.organization_id, p.organization_phone_id, p.phone_jid, "open") for p in phones]
        await fleet[0].events(opens)
        for round_ in range(3):  # each phone's errors spread over the replicas, all phones at once
            await asyncio.gather(
                *(
                    fleet[(round_ + index) % 3].events(
                        [decrypt_error(p.organization_id, p.organization_phone_id, p.phone_jid, BAD_MAC)]
                    )
                    for index, p in enumerate(phones)
                )
            )
        await eventually(lambda: settled(fleet), what="every admitted close done")
        assert await closure_count(db) == 20
        held = await db.fetchval("SELECT count(*) FROM wa_sidecar.session_counters WHERE phase = 'held'")
        assert held == 180
        answers = [await replica.request("GET", "/v1/breaker") for replica in fleet]
        for status, breaker in answers:
            assert status == 200
            assert breaker["tripped"] is True and breaker["heldSessions"] == 180 and breaker["closesInWindow"] == 20

        # A crashed replica comes back still tripped: a fresh phone at its limit is held, not logged out.
        fleet[0].kill()
        await fleet[0].wait_exited()
        await fleet[0].start()
        fresh = await add_phone(db, 9, "79009999999", keys=("creds",))
        await fleet[0].events([connection_update(9, fresh.organization_phone_id, fresh.phone_jid, "open")])
        await fleet[0].events([decrypt_error(9, fresh.organization_phone_id, fresh.phone_jid, BAD_MAC)] * 3)
        await eventually(lambda: settled(fleet), what="no close in flight")
        status, breaker = await fleet[0].request("GET", "/v1/breaker")
        assert breaker["tripped"] is True and breaker["heldSessions"] == 181
        assert await closure_count(db) == 20
        assert await keys_of(db, fresh) == {"creds"}

        # Released with closeHeld through another replica: every held phone is closed exactly once.
        status, released = await fleet[1].request(
            "POST", "/v1/breaker", {"action": "release", "operator": "oncall", "closeHeld": True}
        )
        assert status == 200 and len(released["closed"]) == 181
        await eventually(lambda: settled(fleet), what="the held phones closed")
    assert await closure_count(db) == 201
    per_phone = await db.fetch("SELECT organization_phone_id, count(*) FROM wa_sidecar.closures GROUP BY 1")
    assert len(per_phone) == 201 and {row["count"] for row in per_phone} == {1}


async def test_a_mode_change_through_one_replica_holds_on_the_others_within_a_second(
    database: str, tmp_path: Path
) -> None:
    async with replicas(3, database, tmp_path) as fleet:
        status, _ = await fleet[0].request("POST", "/v1/mode", {"mode": "observe", "operator": "oncall"})
        assert status == 200
        changed = time.monotonic()
        seen: dict[str, float] = {}

        async def observing(replica: Replica) -> bool:
            async with aiohttp.ClientSession() as http, http.get(replica.base + "/metrics") as response:
                text = await response.text()
            if 'whatsapp_sidecar_mode{mode="observe"} 1.0' in text:
                seen.setdefault(replica.name, time.monotonic() - changed)
                return True
            return False

        for replica in fleet[1:]:
            await eventually(partial(observing, replica), deadline_seconds=5, interval=0.02)
        assert max(seen.values()) <= 1.0, seen
        for replica in fleet:
            status, mode = await replica.request("GET", "/v1/mode")
            assert status == 200 and mode["mode"] == "observe"


class Ends:
    """A runtime's session.end callback: what the sidecar asked it to end."""

    def __init__(self) -> None:
        self.commands: list[dict[str, Any]] = []

    async def __call__(self, command: dict[str, Any]) -> None:
        self.commands.append(command)


def ws_url(replica: Replica) -> str:
    return replica.base.replace("http://", "ws://") + "/v1/runtime"


async def lease_holder(db: asyncpg.Connection, phone_id: int) -> str | None:
    holder: str | None = await db.fetchval(
        "SELECT o.instance FROM wa_sidecar.socket_owners AS o JOIN wa_sidecar.replica_leases AS r USING (instance) "
        "WHERE o.organization_phone_id = $1 AND r.lease_until >= now()",
        phone_id,
    )
    return holder


async def test_an_operator_close_through_b_ends_the_socket_held_on_a_once(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    ends = Ends()
    async with replicas(2, database, tmp_path) as (a, b), RuntimeClient(ws_url(a), on_session_end=ends) as runtime:
        await runtime.send(connection_update(1, pid, jid, "open"))
        await eventually(lambda: _held_by(db, pid, "replica-a"), what="replica a holds the lease")
        status, answer = await b.request("POST", f"/v1/sessions/{pid}/close", {"reason": "Maintenance restart"})
        assert status == 200, answer
        assert answer["alreadyClosed"] is False and answer["socket"] == "ended", answer
        assert len(ends.commands) == 1 and ends.commands[0]["reason"] == "forced"
        status, again = await a.request("POST", f"/v1/sessions/{pid}/close", {"reason": "Maintenance restart"})
        assert status == 200 and again["alreadyClosed"] is True
        await eventually(lambda: settled([a, b]), what="no close in flight")
        assert len(ends.commands) == 1
    assert len(await closures_of(db, pid)) == 1
    assert await keys_of(db, phone) == set()


async def test_with_the_runtime_key_store_what_the_runtime_deleted_comes_back_through_the_owning_replica(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    said: list[dict[str, Any]] = []

    async def end_deleting_keys(command: dict[str, Any]) -> int:
        said.append(command)
        return 11  # the runtime deleted eleven keys through its own store

    extra = ["--key-store", "runtime"]
    async with (
        replicas(2, database, tmp_path, extra) as (a, b),
        RuntimeClient(ws_url(a), on_session_end=end_deleting_keys) as runtime,
    ):
        await runtime.send(connection_update(1, pid, jid, "open"))
        await eventually(lambda: _held_by(db, pid, "replica-a"), what="replica a holds the lease")
        status, answer = await b.request("POST", f"/v1/sessions/{pid}/close", {"reason": "Maintenance restart"})
        assert status == 200, answer
        assert answer["socket"] == "ended" and answer["keysDeleted"] == 11, answer
        await eventually(lambda: settled([a, b]), what="no close in flight")
    [closure] = await closures_of(db, pid)
    assert closure["keys_deleted"] == 11
    assert await keys_of(db, phone) != set(), "the sidecar deleted no row itself: the keys were the runtime's"
    routed = await db.fetchval(
        "SELECT keys_deleted FROM wa_sidecar.socket_commands WHERE organization_phone_id = $1", pid
    )
    assert routed == 11 and len(said) == 1


async def _held_by(db: asyncpg.Connection, phone_id: int, replica: str) -> bool:
    holder = await lease_holder(db, phone_id)
    return holder is not None and holder.startswith(replica + "/")


async def test_two_runtimes_claiming_one_phone_on_two_replicas_is_one_conflict_incident(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 3, "79001112244")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with replicas(2, database, tmp_path) as (a, b):
        async with RuntimeClient(ws_url(a)) as first, RuntimeClient(ws_url(b)) as second:
            await first.send(connection_update(3, pid, jid, "open"))
            await eventually(lambda: _held_by(db, pid, "replica-a"), what="replica a holds the lease")
            await second.send(connection_update(3, pid, jid, "open"))
            for _ in range(3):  # the second runtime keeps going: still one incident
                await second.send(decrypt_error(3, pid, jid, "No session record"))
            await second.flush()
            await eventually(lambda: _incidents(db, pid), what="the conflict recorded")
            async with aiohttp.ClientSession() as http, http.get(b.base + "/metrics") as response:
                metrics = await response.text()
            assert await _held_by(db, pid, "replica-a"), "the first runtime keeps the phone"  # both still connected
    rows = await db.fetch(
        "SELECT detail FROM wa_sidecar.decisions "
        "WHERE decision = 'credentials_conflict' AND organization_phone_id = $1",
        pid,
    )
    assert len(rows) == 1 and '"otherReplica": "replica-a/' in rows[0]["detail"]
    assert 'whatsapp_session_incidents_total{kind="credentials_conflict",organization_id="3"} 1.0' in metrics


async def _incidents(db: asyncpg.Connection, phone_id: int) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM wa_sidecar.decisions "
        "WHERE decision = 'credentials_conflict' AND organization_phone_id = $1",
        phone_id,
    )
    return bool(count)


async def test_a_replica_killed_in_the_middle_of_a_close_has_it_finished_once_by_another(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    received = asyncio.Event()
    never = asyncio.Event()

    async def hang(command: dict[str, Any]) -> None:  # the runtime never acknowledges: the close waits on it
        received.set()
        await never.wait()

    extra = ["--close-lease-seconds", "2", "--socket-end-timeout", "3"]
    async with replicas(2, database, tmp_path, extra) as (a, b):
        async with RuntimeClient(ws_url(a), on_session_end=hang, reconnect_initial=5) as runtime:
            await runtime.send(connection_update(1, pid, jid, "open"))
            for _ in range(3):
                await runtime.send(decrypt_error(1, pid, jid, BAD_MAC))
            await asyncio.wait_for(received.wait(), 20)
            a.kill()  # mid-close: the socket end is unanswered, the database half not started
            await a.wait_exited()
            assert await closures_of(db, pid) == []
            await eventually(lambda: _closed(db, pid), what="replica b finished the close")
        await a.start()
        await eventually(lambda: settled([a, b]), what="no close in flight")
    [closure] = await closures_of(db, pid)
    assert closure["reason"] == "bad_mac_limit" and closure["trigger"] == "automatic"
    generation = "SELECT generation FROM wa_sidecar.session_counters WHERE organization_phone_id = $1"
    assert await db.fetchval(generation, pid) == 2  # claimed by a, taken over by b
    assert await keys_of(db, phone) == set()
    assert "finishing a close another replica left behind" in b.log()


async def test_a_reconnect_loop_spread_over_two_replicas_is_seen_once(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 5, "79001112255")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with replicas(2, database, tmp_path) as fleet:
        await fleet[0].events([connection_update(5, pid, jid, "open")])
        for index in range(6):  # six closes within the window, three on each replica (the limit is five)
            await fleet[index % 2].events([connection_update(5, pid, jid, "close", 428)])
            await fleet[index % 2].events([connection_update(5, pid, jid, "open")])
        await eventually(lambda: _decisions(db, pid, "reconnect_loop"), what="the loop recorded")
        await eventually(lambda: settled(fleet), what="every record written")
    rows = await db.fetch(
        "SELECT decision FROM wa_sidecar.decisions WHERE organization_phone_id = $1 AND decision = 'reconnect_loop'",
        pid,
    )
    assert len(rows) == 1


async def _decisions(db: asyncpg.Connection, phone_id: int, decision: str) -> bool:
    query = "SELECT count(*) FROM wa_sidecar.decisions WHERE organization_phone_id = $1 AND decision = $2"
    return bool(await db.fetchval(query, phone_id, decision))
