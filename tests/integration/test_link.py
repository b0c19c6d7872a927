"""The runtime link end to end: a real aiohttp server, real WebSocket clients (the SDK), real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import asyncpg

from sidecar.client import RuntimeClient, activity, connection_update, decrypt_error
from sidecar.events.schema import MAX_EVENTS_PER_FRAME
from tests.pgcluster import free_port
from tests.seed import KEY_NAMES, add_phone, keys_of, phone_row
from tests.server import serving, sidecar_config
from tests.waiting import eventually

TOKEN = "runtime-secret"
OPERATOR_TOKEN = "operator-token-for-link-tests"


class Recorder:
    """Command callbacks of a runtime, recording what the sidecar asked."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.commands: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    async def __call__(self, command: dict[str, Any]) -> None:
        self.commands.append(command)
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "fail":
            raise RuntimeError("sock.end failed")


async def closure_rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM wa_sidecar.closures")


async def test_three_bad_macs_end_the_session_over_the_link(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    ends, clears = Recorder(), Recorder()
    async with (
        serving(sidecar_config(database, runtime_token=TOKEN)) as served,
        RuntimeClient(served.ws_url, TOKEN, on_session_end=ends, on_auth_clear=clears) as client,
    ):
        await client.wait_connected()
        await client.send(connection_update(1, pid, jid, "open"))
        bad_mac = decrypt_error(1, pid, jid, "Bad MAC", source="message", message_type="pkmsg")
        await client.send(bad_mac)
        await eventually(lambda: len(clears.commands) == 1, what="the first error's heal reached the runtime")
        for _ in range(2):
            await client.send(bad_mac)
        await eventually(lambda: len(ends.commands) == 1, what="session.end received")
        await served.components.runtime.settle()
        stats = served.components.runtime.get_session_error_stats(pid)
        assert served.components.link.commands_in_flight == 0
        assert served.components.link.owner_of(pid) is None
    [command] = ends.commands
    assert command["organizationPhoneId"] == pid and command["logout"] is True
    assert command["reason"] == "bad_mac_limit"
    assert await keys_of(db, phone) == set()
    assert (await phone_row(db, phone))["status"] == "logged_out"
    assert stats == {
        "badMacErrors": 0,
        "badDecryptErrors": 0,
        "maxBadMacErrors": 3,
        "maxBadDecryptErrors": 5,
        "isHealthy": True,
    }
    [closure] = await closure_rows(db)
    assert closure["socket"] == "ended" and closure["reason"] == "bad_mac_limit"
    # The first heal's auth.clear named the narrowest keys; the second heal may be superseded by the close.
    assert clears.commands[0]["keyPrefixes"] == ["session-", "sender-key-"]
    assert all(c["keyPrefixes"] == ["session-", "sender-key-"] for c in clears.commands)


async def test_one_bad_decrypt_clears_only_app_state_keys(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    clears = Recorder()
    async with (
        serving(sidecar_config(database)) as served,
        RuntimeClient(served.ws_url, on_auth_clear=clears) as client,
    ):
        error = "Error: error:1C800064:Provider routines::bad decrypt\n    at Decipheriv.final"
        await client.send(decrypt_error(1, pid, jid, error, source="app-state"))
        await eventually(lambda: len(clears.commands) == 1, what="auth.clear received")
        await served.components.runtime.settle()
    assert clears.commands[0]["keyPrefixes"] == ["app-state-sync-"]
    assert await keys_of(db, phone) == {k for k in KEY_NAMES if not k.startswith("app-state-sync-")}


async def test_runtime_disconnecting_mid_close_still_completes_the_close(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with serving(sidecar_config(database)) as served:
        client: RuntimeClient

        async def vanish(command: dict[str, Any]) -> None:
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, client.stop())
            await asyncio.Event().wait()

        client = RuntimeClient(served.ws_url, on_session_end=vanish)
        await client.start()
        for _ in range(3):
            await client.send(decrypt_error(1, pid, jid, "No matching sessions found for message"))
        await eventually(lambda: served.components.runtime.is_closed(pid), what="session closed")
        await served.components.runtime.settle()
        await client.stop()
        assert served.components.link.commands_in_flight == 0
    [closure] = await closure_rows(db)
    assert closure["socket"] == "unreachable"
    assert await keys_of(db, phone) == set()


async def test_runtime_that_never_acks_times_out_and_the_close_completes(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    silent = Recorder("hang")
    async with (
        serving(sidecar_config(database, socket_end_timeout=0.3)) as served,
        RuntimeClient(served.ws_url, on_session_end=silent) as client,
    ):
        for _ in range(3):
            await client.send(decrypt_error(1, pid, jid, "Bad MAC"))
        await eventually(lambda: served.components.runtime.is_closed(pid), what="session closed")
        await served.components.runtime.settle()
        assert served.components.link.commands_in_flight == 0
        silent.release.set()
    [closure] = await closure_rows(db)
    assert closure["socket"] == "timeout"
    assert (await phone_row(db, phone))["status"] == "logged_out"


async def test_a_failing_runtime_command_is_recorded(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    async with (
        serving(sidecar_config(database)) as served,
        RuntimeClient(served.ws_url, on_session_end=Recorder("fail")) as client,
    ):
        for _ in range(3):
            await client.send(decrypt_error(1, phone.organization_phone_id, phone.phone_jid, "Bad MAC"))
        await eventually(lambda: served.components.runtime.is_closed(phone.organization_phone_id))
        await served.components.runtime.settle()
    [closure] = await closure_rows(db)
    assert closure["socket"] == "failed: RuntimeError: sock.end failed"


async def test_commands_go_to_the_runtime_that_last_reported_the_session(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    first, second = Recorder(), Recorder()
    async with (
        serving(sidecar_config(database)) as served,
        RuntimeClient(served.ws_url, on_session_end=first, on_auth_clear=first) as a,
        RuntimeClient(served.ws_url, on_session_end=second, on_auth_clear=second) as b,
    ):
        await a.send(connection_update(1, pid, jid, "open"))
        await a.flush()
        await eventually(lambda: served.components.link.owner_of(pid) is not None)
        owner_a = served.components.link.owner_of(pid)
        await b.send(decrypt_error(1, pid, jid, "Bad MAC"))
        await eventually(lambda: len(second.commands) == 1, what="auth.clear at the second runtime")
        assert served.components.link.owner_of(pid) is not owner_a
        assert served.components.link.ownership_changes == 1
        await b.send(decrypt_error(1, pid, jid, "Bad MAC"))
        await b.send(decrypt_error(1, pid, jid, "Bad MAC"))
        await eventually(lambda: any(c["type"] == "session.end" for c in second.commands))
        await served.components.runtime.settle()
    assert first.commands == []


async def test_a_session_reported_after_a_link_reconnect_gets_its_commands_there(
    database: str, db: asyncpg.Connection
) -> None:
    """What a runtime sends for each open session once its link is back (an activity with nothing but the session,
    no lastInboundAt): the session's commands go to that connection from then on, and its counters stay."""
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    before, after = Recorder(), Recorder()
    config = sidecar_config(database, api_token=OPERATOR_TOKEN)
    auth = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    async with serving(config) as served, aiohttp.ClientSession(served.base, headers=auth) as http:
        async with RuntimeClient(served.ws_url, on_session_end=before, on_auth_clear=before) as first:
            await first.send(connection_update(1, pid, jid, "open"))
            await first.send(decrypt_error(1, pid, jid, "Bad MAC"))
            await eventually(lambda: len(before.commands) == 1, what="the heal's auth.clear at the first connection")
        async with RuntimeClient(served.ws_url, on_session_end=after, on_auth_clear=after) as second:
            report = activity(1, pid, jid, None)
            assert "lastInboundAt" not in report
            await second.send(report)
            await second.flush()
            await eventually(lambda: served.components.link.owner_of(pid) is not None, what="claimed again")
            async with http.post(f"/v1/sessions/{pid}/close", json={"reason": "moved runtime"}) as response:
                assert response.status == 200, await response.text()
                body = await response.json()
            assert [command["type"] for command in after.commands] == ["session.end"]
            assert body["socket"] == "ended" and body["badMacErrors"] == 1


async def test_tokens_are_required_when_configured(database: str) -> None:
    async with serving(sidecar_config(database, runtime_token=TOKEN)) as served, aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            async with http.get(served.base + "/v1/runtime", headers=headers) as response:
                assert response.status == 401
                assert "runtime token" in (await response.json())["error"]
            async with http.post(served.base + "/v1/events", json={}, headers=headers) as response:
                assert response.status == 401
        refused = RuntimeClient(served.ws_url, "wrong", reconnect_initial=0.05)
        await refused.start()
        await eventually(lambda: refused.last_error is not None and "401" in refused.last_error)
        await refused.stop()
        async with RuntimeClient(served.ws_url, TOKEN) as accepted:
            await accepted.wait_connected()


async def test_invalid_frames_are_refused_whole_and_the_connection_stays_open(
    database: str, db: asyncpg.Connection
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with serving(sidecar_config(database)) as served, aiohttp.ClientSession() as http:
        async with http.ws_connect(served.ws_url) as ws:
            valid = decrypt_error(1, pid, jid, "Bad MAC")
            cases: list[tuple[str, str]] = [
                ("{not json", ""),
                (json.dumps({"type": "bogus"}), "type"),
                (json.dumps({**valid, "organizationPhoneId": "42"}), "organizationPhoneId"),
                (json.dumps({**valid, "organizationId": True}), "organizationId"),
                (json.dumps({**valid, "phoneJid": "not-a-jid"}), "phoneJid"),
                (json.dumps({**valid, "source": "sms"}), "source"),
                (json.dumps({**valid, "at": "yesterday"}), "at"),
                (json.dumps([valid, {**valid, "error": ""}]), "error"),  # one bad item spoils the frame
                (json.dumps([]), ""),
                (json.dumps([valid] * (MAX_EVENTS_PER_FRAME + 1)), ""),
                (json.dumps(42), ""),
            ]
            for frame, field in cases:
                await ws.send_str(frame)
                answer = await ws.receive_json(timeout=10)
                assert answer["type"] == "error", frame[:80]
                if field:
                    assert field in {d["field"] for d in answer["details"]}, answer
                    if field == "error":
                        assert answer["details"][0]["index"] == 1
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive_json(timeout=10))["type"] == "error"
            assert served.components.runtime.session(pid) is None  # nothing from any bad frame was applied
            await ws.send_str(json.dumps(valid))  # the same connection still works
            await eventually(lambda: served.components.runtime.session(pid) is not None)
            assert served.components.runtime.get_session_error_stats(pid)["badMacErrors"] == 1
            assert served.components.intake.frames_rejected == len(cases) + 1


async def test_a_huge_frame_closes_that_connection_only(database: str) -> None:
    async with serving(sidecar_config(database)) as served, aiohttp.ClientSession() as http:
        async with http.ws_connect(served.ws_url, max_msg_size=0) as bystander:
            async with http.ws_connect(served.ws_url, max_msg_size=0) as ws:
                await eventually(lambda: served.components.link.connection_count == 2)
                try:
                    await ws.send_str("[" + " " * (5 * 1024 * 1024) + "]")
                    message = await ws.receive(timeout=10)
                    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                    assert ws.close_code == 1009  # message too big
                except ConnectionError:
                    pass  # the sidecar hung up before the client finished writing the frame
                await eventually(lambda: served.components.link.connection_count == 1, what="only it was closed")
            await bystander.send_str(json.dumps(connection_update(1, 5, "79001112233@s.whatsapp.net", "open")))
            await eventually(lambda: served.components.runtime.session(5) is not None)


async def test_a_ten_thousand_event_batch_is_applied(database: str) -> None:
    async with serving(sidecar_config(database)) as served, aiohttp.ClientSession() as http:
        batch = [
            connection_update(1, 1000 + i, f"7900{i:07d}@s.whatsapp.net", "open") for i in range(MAX_EVENTS_PER_FRAME)
        ]
        async with http.ws_connect(served.ws_url) as ws:
            await ws.send_str(json.dumps(batch))
            await eventually(lambda: sum(1 for _ in served.components.runtime.sessions()) == MAX_EVENTS_PER_FRAME)
        async with http.get(served.base + "/v1/sessions") as response:
            sessions = (await response.json())["sessions"]
    assert len(sessions) == MAX_EVENTS_PER_FRAME
    assert all(s["connected"] and s["state"] == "active" for s in sessions)


async def test_the_sdk_buffers_while_the_sidecar_is_away(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    config = sidecar_config(database)
    client = RuntimeClient("ws://127.0.0.1:9/v1/runtime", max_buffered=3, reconnect_initial=0.05)
    await client.start()
    for _ in range(2):
        assert client.send_nowait(decrypt_error(1, pid, jid, "Bad MAC"))
    assert client.send_nowait(connection_update(1, pid, jid, "connecting"))
    assert not client.send_nowait(connection_update(1, pid, jid, "connecting"))  # full: dropped, not blocked
    assert client.dropped == 1
    await client.stop()
    async with serving(config) as served:
        client.url = served.ws_url
        await client.start()
        await client.flush()
        await eventually(lambda: served.components.runtime.session(pid) is not None)
        await eventually(lambda: served.components.runtime.get_session_error_stats(pid)["badMacErrors"] == 2)
        await client.stop()


async def test_the_sdk_reconnects_when_the_sidecar_restarts(database: str) -> None:
    port = free_port()
    jid = "79001112233@s.whatsapp.net"
    ends = Recorder()
    client = RuntimeClient(f"ws://127.0.0.1:{port}/v1/runtime", on_session_end=ends, reconnect_initial=0.05)
    async with serving(sidecar_config(database), port=port) as first:
        await client.start()
        await client.wait_connected()
        await client.send(decrypt_error(1, 9, jid, "Bad MAC"))
        await eventually(lambda: first.components.runtime.session(9) is not None)
    await eventually(lambda: not client.connected.is_set(), what="client noticed the sidecar went away")
    await client.send(decrypt_error(1, 9, jid, "Bad MAC"))  # buffered while the sidecar is away
    async with serving(sidecar_config(database), port=port) as second:
        await client.wait_connected()
        # The restarted sidecar continues from the stored count: 1 before, 1 buffered, 1 now closes.
        await eventually(lambda: second.components.runtime.get_session_error_stats(9)["badMacErrors"] == 2)
        await client.send(decrypt_error(1, 9, jid, "Bad MAC"))
        await eventually(lambda: len(ends.commands) == 1, what="session.end over the new connection")
        await second.components.runtime.settle()
    assert client.connects == 2
    await client.stop()
