"""The runtime link across replica restarts and resets, with real `wa-sidecar serve` processes and the Python SDK:
a restarted replica does not accuse its own dead predecessor, every close counts what became of its socket, and a
runtime that resets its connection mid-stream is logged as such. Outcomes are read with SQL and the stock
Prometheus parser."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from sidecar.client import RuntimeClient, connection_update, decrypt_error
from tests.integration.test_fleet import Ends, _held_by, lease_holder, ws_url
from tests.replicas import Replica, replicas, settled
from tests.seed import add_phone
from tests.waiting import eventually


async def conflicts(db: asyncpg.Connection, phone_id: int) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM wa_sidecar.decisions WHERE decision = 'credentials_conflict' "
        "AND organization_phone_id = $1",
        phone_id,
    )
    return count


async def socket_outcomes(replica: Replica) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(replica.base + "/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        if family.name == "whatsapp_session_close_socket_outcomes":
            return {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}
    raise AssertionError("no whatsapp_session_close_socket_outcomes_total")


async def test_a_replica_restarted_after_a_sigkill_takes_its_phones_back_without_a_conflict(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    ends = Ends()
    async with replicas(2, database, tmp_path) as (a, b):
        async with RuntimeClient(ws_url(a), on_session_end=ends) as runtime:
            await runtime.send(connection_update(1, pid, jid, "open"))
            await eventually(lambda: _held_by(db, pid, "replica-a"), what="replica a holds the lease")
            before = await lease_holder(db, pid)
            a.kill()
            await a.wait_exited()
            await a.start()  # the same instance name (a pod's container restarted), a new process
            await runtime.wait_connected()
            await runtime.send(decrypt_error(1, pid, jid, "Bad MAC"))
            await runtime.flush()

            async def taken_back() -> bool:
                holder = await lease_holder(db, pid)
                return holder is not None and holder.startswith("replica-a/") and holder != before

            await eventually(taken_back, what="the restarted process holds the lease")
            assert await conflicts(db, pid) == 0
            # A close through the other replica reaches the runtime on the restarted one.
            status, answer = await b.request("POST", f"/v1/sessions/{pid}/close", {"reason": "Maintenance"})
            assert status == 200 and answer["socket"] == "ended", answer
            assert [command["organizationPhoneId"] for command in ends.commands] == [pid]
        await eventually(lambda: settled([a, b]), what="no close in flight")
        assert (await socket_outcomes(b))["ended"] == 1
    assert await conflicts(db, pid) == 0


async def test_every_close_counts_what_became_of_its_socket(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    held, away = await add_phone(db, 1, "79001112233"), await add_phone(db, 1, "79004445566")
    async with replicas(1, database, tmp_path) as (replica,), RuntimeClient(ws_url(replica)) as runtime:
        await runtime.send(connection_update(1, held.organization_phone_id, held.phone_jid, "open"))
        for _ in range(3):
            await runtime.send(decrypt_error(1, held.organization_phone_id, held.phone_jid, "Bad MAC"))
        await runtime.flush()
        # The other phone's errors come over HTTP: no runtime connection holds it.
        await replica.events([decrypt_error(1, away.organization_phone_id, away.phone_jid, "Bad MAC")] * 3)
        await eventually(lambda: settled([replica]), what="both closes done")

        async def counted() -> bool:
            outcomes = await socket_outcomes(replica)
            return outcomes["ended"] == 1 and outcomes["unreachable"] == 1

        await eventually(counted, what="one ended, one unreachable")
        outcomes = await socket_outcomes(replica)
        assert outcomes["timeout"] == 0 and outcomes["failed"] == 0


async def test_a_runtime_resetting_its_connection_mid_stream_is_logged_as_a_reset(
    database: str, tmp_path: Path
) -> None:
    async with replicas(1, database, tmp_path) as (replica,):
        host, port = "127.0.0.1", int(replica.base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"GET /v1/runtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert b"101" in (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0]
        payload = b"not json"  # each frame is answered with an error, so the sidecar keeps writing
        frame = bytes([0x81, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload  # masked with a zero key
        writer.write(frame * 2000)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a RST
        writer.transport.abort()

        async def logged() -> bool:
            return "runtime disconnected" in replica.log()

        await eventually(logged, what="the connection's end logged")
        status, _ = await replica.request("GET", "/readyz")
        assert status == 200
    assert "Traceback" not in replica.log() and "unhandled error" not in replica.log(), replica.log()[-3000:]


async def next_command(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next command of this kind (acks of the events come too); acknowledged as done."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if message.get("type") == kind:
            await ws.send(json.dumps({"type": "command.ack", "commandId": message["commandId"], "ok": True}))
            return dict(message)


async def closure_socket(db: asyncpg.Connection, phone_id: int) -> str | None:
    value: str | None = await db.fetchval(
        "SELECT socket FROM wa_sidecar.closures WHERE organization_phone_id = $1 ORDER BY started_at DESC LIMIT 1",
        phone_id,
    )
    return value


async def test_a_close_decided_while_the_runtime_was_away_reaches_it_once_it_is_back(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Finding 2 of the link-delivery issue: a close after a link reconnect deleted the keys and said
    `socket: unreachable`, and the runtime was never told. Now the end is owed: delivered on a reconnect with the
    same runtimeId (to the same replica), or when the old session shows up on another replica."""
    first, second = await add_phone(db, 1, "79001112233"), await add_phone(db, 1, "79004445566")
    async with replicas(2, database, tmp_path) as (a, b):
        info = json.dumps({"type": "runtime.info", "runtimeId": "backend-1"})
        async with connect(ws_url(a)) as ws:
            await ws.send(info)
            for phone in (first, second):
                await ws.send(json.dumps(connection_update(1, phone.organization_phone_id, phone.phone_jid, "open")))
            await eventually(lambda: _held_by(db, second.organization_phone_id, "replica-a"), what="a holds them")
        # The runtime is away (its link dropped): both phones are closed by an operator, through either replica.
        for replica, phone in ((a, first), (b, second)):
            status, answer = await replica.request(
                "POST", f"/v1/sessions/{phone.organization_phone_id}/close", {"reason": "maintenance"}
            )
            assert status == 200 and answer["socket"] == "unreachable", answer
        async with connect(ws_url(a)) as ws:  # back on the replica that held them, with its runtime id
            await ws.send(info)
            end = await next_command(ws, "session.end")
            assert end["organizationPhoneId"] == first.organization_phone_id and end["logout"] is True
        async with connect(ws_url(b)) as ws:  # the other phone's old session shows up on the other replica
            await ws.send(json.dumps({"type": "runtime.info", "runtimeId": "backend-2"}))
            await ws.send(
                json.dumps(decrypt_error(1, second.organization_phone_id, second.phone_jid, "No session record"))
            )
            end = await next_command(ws, "session.end")
            assert end["organizationPhoneId"] == second.organization_phone_id

        async def recorded() -> bool:
            sockets = [await closure_socket(db, p.organization_phone_id) for p in (first, second)]
            return sockets == ["ended (on reconnect)"] * 2

        await eventually(recorded, what="both closes record the late delivery")
        delivered = 0.0
        for replica in (a, b):
            async with aiohttp.ClientSession() as http, http.get(replica.base + "/metrics") as response:
                for family in text_string_to_metric_families(await response.text()):
                    if family.name == "whatsapp_session_owed_ends_delivered":
                        delivered += sum(s.value for s in family.samples if s.name.endswith("_total"))
        assert delivered == 2
        assert await db.fetchval("SELECT count(*) FROM wa_sidecar.socket_commands WHERE status = 'owed'") == 0
        assert len(await db.fetch("SELECT 1 FROM wa_sidecar.closures")) == 2  # the database half was not repeated


async def test_a_new_login_makes_an_owed_end_moot(database: str, db: asyncpg.Connection, tmp_path: Path) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with replicas(1, database, tmp_path) as (replica,):
        await replica.events([connection_update(1, pid, jid, "open")])  # reported over HTTP: no connection holds it
        status, answer = await replica.request("POST", f"/v1/sessions/{pid}/close", {"reason": "maintenance"})
        assert status == 200 and answer["socket"] == "unreachable", answer
        assert await db.fetchval("SELECT count(*) FROM wa_sidecar.socket_commands WHERE status = 'owed'") == 1
        async with connect(ws_url(replica)) as ws:  # a fresh QR pairing of the number: no end for it
            await ws.send(json.dumps({**connection_update(1, pid, jid, "open"), "isNewLogin": True}))

            async def moot() -> bool:
                return bool(
                    await db.fetchval("SELECT count(*) FROM wa_sidecar.socket_commands WHERE status = 'moot'") == 1
                )

            await eventually(moot, what="the owed end dropped")
