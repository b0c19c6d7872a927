"""Every session rule, driven through the runtime, against the seed schema in a fresh PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from sidecar.client import connection_update_event, decrypt_error_event
from sidecar.rules.classification import ErrorClass, ErrorSource
from sidecar.runtime import InvalidInput, UnknownSession
from sidecar.runtime.errors import CloseIncomplete
from sidecar.telemetry.action_log import ClosureLogFile
from tests.harness import runtime_over
from tests.seed import KEY_NAMES, add_phone, keys_of, phone_row, refuse_key_deletes

PEER = "15550002222@s.whatsapp.net"


async def closures(db: asyncpg.Connection, phone_id: int) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM wa_sidecar.closures WHERE organization_phone_id = $1", phone_id)


async def stored_counters(db: asyncpg.Connection, phone_id: int) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", phone_id)


async def test_bad_mac_below_limit_deletes_only_the_failing_peers_sessions(
    database: str, db: asyncpg.Connection
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    neighbour = await add_phone(db, 1, "79004445566")
    async with runtime_over(database) as h:
        socket = h.socket(phone.organization_phone_id)
        continues = await h.runtime.handle_bad_mac_error(1, phone.organization_phone_id, phone.phone_jid, PEER)
        await h.runtime.settle()
        await h.pending.drained()
    assert continues is True
    gone = set(KEY_NAMES) - await keys_of(db, phone)
    assert gone == {"session-15550002222.0", "session-15550002222.3"}
    assert await keys_of(db, neighbour) == set(KEY_NAMES)
    assert socket.cleared == [("session-15550002222.", "session-15550002222_")]
    row = await stored_counters(db, phone.organization_phone_id)
    assert row is not None and (row["bad_mac_errors"], row["bad_decrypt_errors"]) == (1, 0)


async def test_bad_decrypt_below_limit_deletes_only_app_state_keys(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    neighbour = await add_phone(db, 1, "79004445566")
    async with runtime_over(database) as h:
        socket = h.socket(phone.organization_phone_id)
        continues = await h.runtime.handle_bad_decrypt_error(1, phone.organization_phone_id, phone.phone_jid)
        await h.runtime.settle()
        stats = h.runtime.get_session_error_stats(phone.organization_phone_id)
    assert continues is True
    remaining = await keys_of(db, phone)
    assert remaining == {key for key in KEY_NAMES if not key.startswith("app-state-sync-")}
    assert await keys_of(db, neighbour) == set(KEY_NAMES)
    assert socket.cleared == [("app-state-sync-",)]
    assert socket.ended == []
    assert stats == {
        "badMacErrors": 0,
        "badDecryptErrors": 1,
        "maxBadMacErrors": 3,
        "maxBadDecryptErrors": 5,
        "isHealthy": True,
    }


async def test_third_bad_mac_closes_logs_out_and_records(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    neighbour = await add_phone(db, 1, "79004445566")
    other_org_same_number = await add_phone(db, 2, "79001112299")
    before = datetime.now(UTC)
    async with runtime_over(database) as h:
        socket = h.socket(phone.organization_phone_id)
        results = [
            await h.runtime.handle_bad_mac_error(1, phone.organization_phone_id, phone.phone_jid) for _ in range(3)
        ]
        await h.runtime.settle()
        stats = h.runtime.get_session_error_stats(phone.organization_phone_id)
        assert h.runtime.session(phone.organization_phone_id) is None
        assert h.sockets.registered == 0
        assert h.runtime.background_tasks == 0
    assert results == [True, True, False]
    assert socket.ended == ["3 Bad MAC errors (limit 3)"]
    assert await keys_of(db, phone) == set()
    assert await keys_of(db, neighbour) == set(KEY_NAMES)
    assert await keys_of(db, other_org_same_number) == set(KEY_NAMES)
    row = await phone_row(db, phone)
    assert row["status"] == "logged_out"
    assert row["qrCode"] is None
    assert row["lastConnectedAt"].replace(tzinfo=UTC) >= before.replace(microsecond=0) - timedelta(seconds=1)
    assert (await phone_row(db, neighbour))["status"] == "connected"
    [closure] = await closures(db, phone.organization_phone_id)
    assert closure["reason"] == "bad_mac_limit"
    assert closure["trigger"] == "automatic"
    assert (closure["bad_mac_errors"], closure["bad_decrypt_errors"]) == (3, 0)
    assert closure["keys_deleted"] > 0
    assert closure["socket"] == "ended"
    assert json.loads(closure["steps"]) == {
        "socket": "ended",
        "authKeys": "ok",
        "phoneStatus": "ok",
        "counters": "ok",
        "closureRecord": "ok",
    }
    # Heals of the first two errors had already removed session and sender keys; the close took the rest.
    assert closure["keys_deleted"] == len(KEY_NAMES) - sum(
        key.startswith(("session-", "sender-key-")) for key in KEY_NAMES
    )
    counters = await stored_counters(db, phone.organization_phone_id)
    assert counters is not None
    assert (counters["bad_mac_errors"], counters["bad_decrypt_errors"]) == (0, 0)
    assert counters["closed_at"] is not None
    assert stats["badMacErrors"] == 0 and stats["isHealthy"] is True


async def test_fifth_bad_decrypt_closes_with_its_reason(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 3, "79001112233")
    async with runtime_over(database) as h:
        h.socket(phone.organization_phone_id)
        results = [
            await h.runtime.apply(
                decrypt_error_event(
                    3,
                    phone.organization_phone_id,
                    phone.phone_jid,
                    "error:1C800064:Provider routines::bad decrypt",
                    source=ErrorSource.APP_STATE,
                )
            )
            for _ in range(5)
        ]
        await h.runtime.settle()
    assert results == [ErrorClass.BAD_DECRYPT] * 5
    [closure] = await closures(db, phone.organization_phone_id)
    assert (closure["reason"], closure["bad_decrypt_errors"]) == ("bad_decrypt_limit", 5)
    assert await keys_of(db, phone) == set()


async def test_media_bad_decrypt_changes_nothing(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    async with runtime_over(database) as h:
        for _ in range(10):
            await h.runtime.apply(
                decrypt_error_event(
                    1, phone.organization_phone_id, phone.phone_jid, "bad decrypt", source=ErrorSource.MEDIA
                )
            )
        await h.runtime.settle()
        stats = h.runtime.get_session_error_stats(phone.organization_phone_id)
    assert stats["badDecryptErrors"] == 0
    assert await keys_of(db, phone) == set(KEY_NAMES)


async def test_open_resets_both_counters_in_memory_and_in_the_database(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    async with runtime_over(database) as h:
        runtime, pid, jid = h.runtime, phone.organization_phone_id, phone.phone_jid
        await runtime.handle_bad_mac_error(1, pid, jid)
        await runtime.handle_bad_decrypt_error(1, pid, jid)
        await runtime.handle_bad_decrypt_error(1, pid, jid)
        await h.pending.drained()
        row = await stored_counters(db, pid)
        assert row is not None and (row["bad_mac_errors"], row["bad_decrypt_errors"]) == (1, 2)
        await runtime.apply(connection_update_event(1, pid, jid, "open"))
        await h.pending.drained()
        stats = runtime.get_session_error_stats(pid)
    assert (stats["badMacErrors"], stats["badDecryptErrors"]) == (0, 0)
    row = await stored_counters(db, pid)
    assert row is not None and (row["bad_mac_errors"], row["bad_decrypt_errors"]) == (0, 0)


async def test_counters_survive_a_restart(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with runtime_over(database) as first:
        await first.runtime.handle_bad_mac_error(1, pid, jid)
        await first.runtime.handle_bad_mac_error(1, pid, jid)
    async with runtime_over(database) as second:
        assert second.runtime.get_session_error_stats(pid)["badMacErrors"] == 2
        second.socket(pid)
        assert await second.runtime.handle_bad_mac_error(1, pid, jid) is False
        await second.runtime.settle()
    assert len(await closures(db, pid)) == 1
    async with runtime_over(database) as third:
        # A phone closed before the restart stays closed: its errors change nothing until it opens again.
        assert third.runtime.is_closed(pid)
        assert await third.runtime.handle_bad_mac_error(1, pid, jid) is False
        await third.runtime.settle()
    assert len(await closures(db, pid)) == 1


async def test_fifty_concurrent_bad_macs_close_exactly_once(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with runtime_over(database) as h:
        socket = h.socket(pid)
        results = await asyncio.gather(*(h.runtime.handle_bad_mac_error(1, pid, jid) for _ in range(50)))
        await h.runtime.settle()
    assert results.count(True) == 2
    assert len(socket.ended) == 1
    assert len(await closures(db, pid)) == 1


async def test_a_failing_key_store_is_not_reported_as_closed_and_a_retry_closes(
    database: str, db: asyncpg.Connection
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    await refuse_key_deletes(db)
    async with runtime_over(database, socket_end_timeout=0.2) as h:
        h.socket(pid, mode="hang")
        await h.runtime.apply(connection_update_event(1, pid, jid, "open"))
        with pytest.raises(CloseIncomplete) as incomplete:
            await h.runtime.force_close_session(pid, "Maintenance restart")
        assert list(incomplete.value.failed) == ["authKeys"]
        assert incomplete.value.failed["authKeys"].startswith("failed: RaiseError: auth store is read-only")
        record = incomplete.value.record
        assert record.socket == "timeout" and record.steps["phoneStatus"] == "ok"
        assert h.runtime.session(pid) is not None and not h.runtime.is_closed(pid), "not done: retryable"
        assert await keys_of(db, phone) == set(KEY_NAMES)
        await db.execute("DROP TRIGGER refuse_delete ON baileys_auth")
        outcome = await h.runtime.force_close_session(pid, "Maintenance restart")  # the retry
        assert outcome.already_closed is False and outcome.record is not None
        assert outcome.record.steps["authKeys"] == "ok"
        assert h.runtime.session(pid) is None
        assert h.runtime.background_tasks == 0
    assert await keys_of(db, phone) == set()
    assert (await phone_row(db, phone))["status"] == "logged_out"
    first, second = sorted(await closures(db, pid), key=lambda row: row["started_at"])
    assert json.loads(first["steps"])["authKeys"].startswith("failed:")  # the closure log keeps the attempt
    assert json.loads(second["steps"])["authKeys"] == "ok"
    counters = await stored_counters(db, pid)
    assert counters is not None and counters["closed_at"] is not None


async def test_a_socket_that_throws_still_closes(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    async with runtime_over(database) as h:
        h.socket(phone.organization_phone_id, mode="fail")
        await h.runtime.apply(connection_update_event(1, phone.organization_phone_id, phone.phone_jid, "open"))
        outcome = await h.runtime.force_close_session(phone.organization_phone_id, "Switching devices")
        assert h.sockets.registered == 0
    assert outcome.record is not None
    assert outcome.record.socket == "failed: RuntimeError: socket.end() threw"
    assert await keys_of(db, phone) == set()


async def test_force_close_is_idempotent_and_needs_no_socket(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with runtime_over(database) as h:
        await h.runtime.apply(connection_update_event(1, pid, jid, "open"))
        first = await h.runtime.force_close_session(pid, "Maintenance restart")
        second = await h.runtime.force_close_session(pid, "Maintenance restart")
    assert first.already_closed is False and first.record is not None
    assert first.record.socket == "unreachable"
    assert first.record.reason == "forced" and first.record.trigger == "operator"
    assert first.record.keys_deleted == len(KEY_NAMES)
    assert second.already_closed is True
    assert second.record is not None and second.record.closure_id == first.record.closure_id
    assert len(await closures(db, pid)) == 1


async def test_critical_close_code_closes_transient_ones_do_not(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with runtime_over(database) as h:
        await h.runtime.apply(connection_update_event(1, pid, jid, "open"))
        for code in (515, 428, 440):
            await h.runtime.apply(connection_update_event(1, pid, jid, "close", code))
        await h.runtime.settle()
        assert h.runtime.session(pid) is not None
        await h.runtime.apply(connection_update_event(1, pid, jid, "close", 401))
        await h.runtime.settle()
    [closure] = await closures(db, pid)
    assert closure["reason"] == "connection_error" and closure["trigger"] == "connection"


async def test_bad_input_is_refused_and_changes_nothing(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid = phone.organization_phone_id
    async with runtime_over(database) as h:
        with pytest.raises(UnknownSession):
            await h.runtime.force_close_session(9999, "Maintenance restart")
        with pytest.raises(UnknownSession):
            h.runtime.get_session_error_stats(9999)
        await h.runtime.apply(connection_update_event(1, pid, phone.phone_jid, "open"))
        for reason in ("", "   "):
            with pytest.raises(InvalidInput) as empty:
                await h.runtime.force_close_session(pid, reason)
            assert empty.value.field == "reason"
        for jid in ("not-a-jid", "79001112233@g.us", "+7 900 111@s.whatsapp.net", ""):
            with pytest.raises(InvalidInput) as malformed:
                await h.runtime.handle_bad_mac_error(1, 4242, jid)
            assert malformed.value.field == "phoneJid"
        with pytest.raises(InvalidInput):
            await h.runtime.apply(connection_update_event(1, pid, phone.phone_jid, "opened"))
        with pytest.raises(InvalidInput):
            await h.runtime.handle_bad_mac_error(0, pid, phone.phone_jid)
        assert h.runtime.session(4242) is None
        assert h.runtime.session(pid) is not None
        await h.pending.drained()
    assert await keys_of(db, phone) == set(KEY_NAMES)
    assert await closures(db, pid) == []
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.session_counters WHERE bad_mac_errors > 0") == 0


async def test_every_close_is_appended_to_the_closure_log_file(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    log_file = tmp_path / "closures" / "closures.jsonl"
    closure_log = ClosureLogFile(log_file)
    async with runtime_over(database, observers=[closure_log]) as h:
        for _ in range(3):
            await h.runtime.handle_bad_mac_error(1, phone.organization_phone_id, phone.phone_jid)
        await h.runtime.settle()
    closure_log.close()  # waits for the writer thread's last line
    [line] = log_file.read_text().splitlines()
    entry = json.loads(line)
    [closure] = await closures(db, phone.organization_phone_id)
    assert entry["closureId"] == closure["closure_id"]
    assert entry["reason"] == "bad_mac_limit" and entry["keysDeleted"] == closure["keys_deleted"]
    assert phone.bare not in line  # no phone numbers in the closure log


async def test_the_embedded_store_follows_the_same_rules() -> None:
    async with runtime_over(None) as h:
        socket = h.socket(42)
        for _ in range(3):
            await h.runtime.handle_bad_mac_error(7, 42, "79001112233@s.whatsapp.net")
        await h.runtime.settle()
        assert socket.ended and h.runtime.is_closed(42)
        # The customer re-scanned the QR code: a new login reopens the phone.
        await h.runtime.apply(connection_update_event(7, 42, "79001112233@s.whatsapp.net", "open", new_login=True))
        assert not h.runtime.is_closed(42)
        assert h.runtime.get_session_error_stats(42)["badMacErrors"] == 0
