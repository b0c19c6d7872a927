"""Every event once across a graceful restart: the Python SDK sends Bad MACs at full speed to a real `wa-sidecar
serve` process that gets SIGTERM and is started again mid-stream. The SDK keeps what the sidecar has not
acknowledged (`events.ack`) and resends it after the reconnect; the sidecar ignores what it already took.
Outcomes are read with SQL: every phone at its limit closed exactly once, every count below it exact."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
from websockets.asyncio.client import ClientConnection, connect

from sidecar.client import RuntimeClient, connection_update, decrypt_error
from tests.integration.test_fleet import ws_url
from tests.replicas import replicas, settled
from tests.seed import add_phone
from tests.waiting import eventually

PHONES = 40


async def stream_through_a_restart(
    database: str, db: asyncpg.Connection, tmp_path: Path, kill: bool
) -> tuple[list[tuple[object, ...]], list[int]]:
    """40 phones, even ones to their Bad MAC limit (3), odd ones to 2, sent at about 500 events/s by the SDK to a
    replica stopped (SIGTERM, or SIGKILL) and started again a third of the way in. Returns the phones whose
    outcome is wrong (not closed exactly once, or an event lost) and the counts of the odd ones."""
    phones = [await add_phone(db, 1, f"7900444{index:04d}") for index in range(PHONES)]
    async with replicas(1, database, tmp_path) as (replica,):
        client = RuntimeClient(ws_url(replica), batch_size=5, reconnect_initial=0.05)
        async with client:
            for phone in phones:
                await client.send(connection_update(1, phone.organization_phone_id, phone.phone_jid, "open"))
            await client.wait_acknowledged()
            errors = [
                decrypt_error(1, phone.organization_phone_id, phone.phone_jid, "Bad MAC")
                for round_ in range(3)
                for index, phone in enumerate(phones)
                if round_ < 2 or index % 2 == 0
            ]
            restart_at = len(errors) // 3
            for index, error in enumerate(errors):
                await client.send(error)
                if index == restart_at:
                    if kill:
                        replica.kill()
                        await replica.wait_exited()
                    else:
                        await replica.stop()  # SIGTERM while frames are in flight
                    await replica.start()
                await asyncio.sleep(0.002)
            await client.wait_acknowledged(timeout=60)
            assert client.unacked_dropped == 0 and client.connects >= 2
        await eventually(lambda: settled([replica]), what="no close in flight")
    rows = await db.fetch(
        "SELECT organization_phone_id, phase, bad_mac_errors FROM wa_sidecar.session_counters "
        "WHERE organization_phone_id = ANY($1::bigint[])",
        [p.organization_phone_id for p in phones],
    )
    by_phone = {row["organization_phone_id"]: row for row in rows}
    grouped = await db.fetch("SELECT organization_phone_id, count(*) AS n FROM wa_sidecar.closures GROUP BY 1")
    closures: dict[int, int] = {row["organization_phone_id"]: row["n"] for row in grouped}
    wrong: list[tuple[object, ...]] = []
    odd_counts: list[int] = []
    for index, phone in enumerate(phones):
        row = by_phone[phone.organization_phone_id]
        if index % 2 == 0:
            if closures.get(phone.organization_phone_id) != 1 or row["phase"] != "closed":
                wrong.append((index, row["phase"], row["bad_mac_errors"], closures.get(phone.organization_phone_id)))
        else:
            odd_counts.append(row["bad_mac_errors"] if row["phase"] == "active" else 3)
            if row["bad_mac_errors"] < 2 and row["phase"] == "active":
                wrong.append((index, row["phase"], row["bad_mac_errors"]))
    return wrong, odd_counts


async def test_a_sigterm_mid_stream_loses_no_event_and_counts_none_twice(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    wrong, odd_counts = await stream_through_a_restart(database, db, tmp_path, kill=False)
    print(f"SIGTERM mid-stream: {len(wrong)} of {PHONES} phones lost an event; odd phones' counts {set(odd_counts)}")
    assert not wrong, wrong
    assert set(odd_counts) == {2}, odd_counts  # nothing twice either


async def test_a_sigkill_mid_stream_loses_nothing_acknowledged(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGKILL: what the sidecar acknowledged is durable, the rest is resent, and in fleet mode a frame decided
    just before the kill is known to be taken (its seq is stored with its decision): every phone at its limit
    closed exactly once, every count below it exact."""
    wrong, odd_counts = await stream_through_a_restart(database, db, tmp_path, kill=True)
    doubled = sum(1 for count in odd_counts if count > 2)
    print(f"SIGKILL mid-stream: {len(wrong)} of {PHONES} phones lost an event; {doubled} odd phones counted twice")
    assert not wrong, wrong
    assert set(odd_counts) == {2}, odd_counts


async def next_ack(ws: ClientConnection) -> dict[str, object]:
    """The next `events.ack` (commands such as a heal's `auth.clear` may come before it)."""
    while True:
        message = json.loads(await ws.recv())
        if message["type"] == "events.ack":
            return dict(message)


async def test_a_raw_runtime_gets_acks_and_a_frame_sent_twice_counts_once(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79004440001")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with replicas(1, database, tmp_path) as (replica,):
        frames = [
            {**connection_update(1, pid, jid, "open"), "seq": 1},
            {**decrypt_error(1, pid, jid, "Bad MAC"), "seq": 2},
        ]
        async with connect(ws_url(replica)) as ws:
            await ws.send(json.dumps({"type": "runtime.info", "runtimeId": "raw-runtime-1"}))
            await ws.send(json.dumps(frames))
            assert await next_ack(ws) == {"type": "events.ack", "upTo": 2}
        async with connect(ws_url(replica)) as ws:  # a reconnect that resends what it is not sure of
            await ws.send(json.dumps({"type": "runtime.info", "runtimeId": "raw-runtime-1"}))
            await ws.send(json.dumps(frames[1]))
            assert await next_ack(ws) == {"type": "events.ack", "upTo": 2}
            await ws.send(json.dumps({**decrypt_error(1, pid, jid, "Bad MAC"), "seq": 3}))
            assert await next_ack(ws) == {"type": "events.ack", "upTo": 3}
        count = await db.fetchval(
            "SELECT bad_mac_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", pid
        )
        assert count == 2
        acked = await db.fetchval("SELECT acked FROM wa_sidecar.link_sequences WHERE runtime_id = 'raw-runtime-1'")
        assert acked == 3
