"""`wa-sidecar ingest-logs` on the real Baileys samples, through the real CLI, against real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from sidecar.ingest.baileys_log import BaileysLogReader
from tests.seed import SeededPhone, add_phone, phone_row
from tests.waiting import eventually

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "baileys"
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "reference" / "baileys-samples" / "baileys-7.0.0-rc14"


def sample(name: str) -> Path:
    """The shared reference samples; the ones the suite depends on are also copied under tests/fixtures."""
    return SAMPLES / name if (SAMPLES / name).exists() else FIXTURES / name


def golden(version: str = "7.0.0-rc14") -> dict[str, dict[str, Any]]:
    """The labelled real lines of one Baileys version (the file holds 7.0.0-rc14 and 6.7.24 lines)."""
    lines = (FIXTURES / "golden_lines.jsonl").read_text().splitlines()
    return {item["label"]: item for item in map(json.loads, lines) if item["baileys"] == version}


def bound(record: dict[str, Any], phone: SeededPhone | None = None, **bindings: object) -> str:
    """A line as a backend's child logger writes it: its bindings first, then Baileys' fields."""
    ids = (
        {"organizationId": phone.organization_id, "organizationPhoneId": phone.organization_phone_id,
         "phoneJid": phone.phone_jid}
        if phone else {"organizationId": 7, "organizationPhoneId": 42, "phoneJid": "79001112233@s.whatsapp.net"}
    )  # fmt: skip
    return json.dumps({"level": record.get("level", 30), **ids, **bindings, **record})


def first(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    assert len(events) <= 1, events
    return events[0] if events else None


def test_golden_shapes_become_the_right_events() -> None:
    events: dict[str, dict[str, Any] | None] = {}
    for version in ("6.7.24", "7.0.0-rc14"):  # one reader per backend: each version's lines share message ids
        reader = BaileysLogReader()
        events |= {label: first(reader.feed(bound(item["line"]) + "\n")) for label, item in golden(version).items()}
        assert reader.stats.unattributed == 0
    pkmsg = events["decrypt_fail.pkmsg_bad_mac"]
    assert pkmsg is not None
    assert pkmsg["error"] == "Bad MAC" and pkmsg["source"] == "message" and pkmsg["messageType"] == "pkmsg"
    assert pkmsg["peerJid"] == "15550002222@s.whatsapp.net" and pkmsg["at"].startswith("2026-11-25T03:52:29")
    group = events["decrypt_fail.group_no_sender_key"]
    assert group is not None and group["peerJid"] == "15550002222@s.whatsapp.net", "the participant, not the group"
    retry, give_up = events["appstate.bad_decrypt_retrying"], events["appstate.bad_decrypt_giving_up"]
    assert retry is not None and retry["source"] == "app-state" and "bad decrypt" in retry["error"]
    assert give_up is None, "one app-state failure that logs twice counts once"
    patch_mac = events["appstate.invalid_patch_mac_skipped"]
    assert patch_mac is not None and patch_mac["error"] == "Invalid patch mac"
    for label in (
        "appstate.missing_key_giving_up",
        "appstate.wrong_key_silently_synced",
        "decrypt_fail.retry_receipt_sent",
    ):
        assert events[label] is None, label
    logged_out = events["connection.update.close_401_loggedOut"]
    assert logged_out is not None and (logged_out["connection"], logged_out["statusCode"]) == ("close", 401)
    restart = events["connection.stream_errored_out_515"]
    assert restart is None, "the stream error line is not the close; the `connection errored` line is"


def test_lines_without_identity_are_counted_as_unattributed_and_a_session_map_names_them() -> None:
    line = golden()["decrypt_fail.pkmsg_bad_mac"]["line"]
    reader = BaileysLogReader()
    assert reader.feed(json.dumps(line) + "\n") == []
    assert reader.stats.unattributed == 1
    from sidecar.ingest.baileys_log import SessionMap

    mapping = SessionMap.from_document(
        {"field": "sessionId", "sessions": {"acme-1": {"organizationId": 3, "organizationPhoneId": 9,
                                                        "phoneJid": "79005550000@s.whatsapp.net"}}}
    )  # fmt: skip
    named = first(BaileysLogReader(session_map=mapping).feed(json.dumps({"sessionId": "acme-1", **line})))
    assert named is not None and (named["organizationId"], named["organizationPhoneId"]) == (3, 9)


def interleaved_session_log(phone: SeededPhone) -> str:
    """The real session log of one phone, with libsignal's console blocks where a backend writes them: just
    before Baileys' `failed to decrypt message` record of the msg-path failure they explain."""
    blocks = (
        sample("session.libsignal-stderr.txt")
        .read_text()
        .split("Failed to decrypt message with any known session...\n")
    )
    blocks = ["Failed to decrypt message with any known session...\n" + block for block in blocks if block.strip()]
    out = []
    for line in sample("session.baileys.pino.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("msg") == "failed to decrypt message" and record["err"]["message"].startswith("No matching"):
            out.append(blocks.pop(0).rstrip("\n"))
        out.append(bound(record, phone))
    assert not blocks, "every console block found its record"
    return "\n".join(out) + "\n"


@asynccontextmanager
async def ingesting(*argv: str, stdin: bytes | None = None) -> AsyncIterator[dict[str, Any]]:
    """Runs `wa-sidecar ingest-logs` and collects its stdout lines; yields {process, lines, base}."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "ingest-logs", "--listen", "127.0.0.1:0", *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    state: dict[str, Any] = {"process": process, "lines": [], "base": None}

    async def read() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            record = json.loads(raw) if raw.startswith(b"{") else {"text": raw.decode()}
            state["lines"].append(record)
            if record.get("msg") == "serving":
                state["base"] = record["listen"]

    reader = asyncio.create_task(read())
    if stdin is not None:
        assert process.stdin is not None
        process.stdin.write(stdin)
        await process.stdin.drain()
        process.stdin.close()
    try:
        yield state
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        await reader


def summary(state: dict[str, Any]) -> dict[str, Any] | None:
    return next((line["ingest"] for line in state["lines"] if "ingest" in line), None)


async def test_libsignal_causes_keep_a_redelivered_message_from_logging_the_phone_out(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 7, "15550001111")
    log = tmp_path / "backend.log"
    log.write_text(interleaved_session_log(phone))
    async with ingesting(str(log), "--database-url", database) as state:
        await eventually(lambda: state["process"].returncode is not None, what="ingest-logs finished")
    assert state["process"].returncode == 0, state["lines"]
    done = summary(state)
    assert done is not None and done["causes_applied"] == 2 and done["libsignal_blocks"] == 2
    startup = next(line for line in state["lines"] if str(line.get("msg", "")).startswith("ingest-logs"))
    assert "commands cannot be delivered" in startup["msg"]
    # pkmsg Bad MAC + msg Bad MAC count; the duplicate (Key used already) does not: 2 of 3, never closed (the
    # reconnects later in the log reset the counters).
    closures = await db.fetchval(
        "SELECT count(*) FROM wa_sidecar.closures WHERE organization_phone_id = $1", phone.organization_phone_id
    )
    assert closures == 0
    assert (await phone_row(db, phone))["status"] == "connected"


async def test_without_libsignal_output_the_same_log_logs_the_phone_out(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 7, "15550001111")
    log = tmp_path / "backend.log"
    log.write_text(
        "".join(
            bound(json.loads(line), phone) + "\n"
            for line in sample("session.baileys.pino.jsonl").read_text().splitlines()
        )
    )
    async with ingesting(str(log), "--database-url", database) as state:
        await eventually(lambda: state["process"].returncode is not None, what="ingest-logs finished")
    assert state["process"].returncode == 0
    row = await phone_row(db, phone)
    assert row["status"] == "logged_out"
    closures = await db.fetchval(
        "SELECT count(*) FROM wa_sidecar.closures WHERE organization_phone_id = $1 AND socket = 'left_to_runtime'",
        phone.organization_phone_id,
    )
    assert closures == 1, "closed once; no runtime to end the socket on this path"


async def test_stdin_and_a_session_map(tmp_path: Path) -> None:
    mapping = tmp_path / "sessions.yaml"
    mapping.write_text(
        "field: session\nsessions:\n  tenant-a:\n    organizationId: 3\n    organizationPhoneId: 9\n"
        "    phoneJid: '79005550000@s.whatsapp.net'\n"
    )
    line = golden()["decrypt_fail.pkmsg_bad_mac"]["line"]
    text = "\n".join(
        json.dumps({"session": "tenant-a", **line, "key": {**line["key"], "id": f"M{i}"}}) for i in range(2)
    )
    async with ingesting("-", "--sessions", str(mapping), stdin=text.encode() + b"\n") as state:
        await eventually(lambda: state["process"].returncode is not None, what="ingest-logs finished")
    done = summary(state)
    assert done is not None and done["events"] == 2 and done["unattributed"] == 0


async def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "sessions.yaml"
    bad.write_text("field: session\nsessions:\n  tenant-a: {organizationId: 3}\n")
    for argv, expected in (
        ([str(tmp_path / "missing.log")], "no such log file"),
        (["-", "--sessions", str(bad)], "sessions.tenant-a: needs organizationId and organizationPhoneId"),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "ingest-logs", *argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, error = await process.communicate()
        assert process.returncode == 2 and expected in error.decode(), error.decode()


async def test_follow_reads_across_rotation_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "backend.log"
    log.write_text("")
    base = golden()["decrypt_fail.pkmsg_bad_mac"]["line"]
    phone_id = 77

    def error_line(n: int, padding: str = "") -> str:
        record = {**base, "key": {**base["key"], "id": f"ROT{n}"}, "err": {"message": "Invalid PreKey ID"}}
        return bound(record, organizationPhoneId=phone_id, padding=padding) + "\n"

    async with ingesting(str(log), "--follow") as state:
        await eventually(lambda: state["base"] is not None, what="serving")

        async def counted(expected: int) -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"{state['base']}/metrics") as response:
                text = await response.text()
            prefix = 'whatsapp_decrypt_errors_total{kind="prekey",organization_id="7"} '
            values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)]
            return values == [float(expected)]

        with log.open("a") as handle:
            handle.write(error_line(1) + error_line(2)[:40])  # the second line is still being written
        await eventually(lambda: counted(1), what="first line read")
        with log.open("a") as handle:
            handle.write(error_line(2)[40:])
        await eventually(lambda: counted(2), what="the finished line read")
        os.rename(log, tmp_path / "backend.log.1")  # logrotate: rename, then a new file
        with (tmp_path / "backend.log.1").open("a") as handle:
            handle.write(error_line(3))  # written to the old file after the rename: still read
        log.write_text(error_line(4, padding="x" * 200))
        await eventually(lambda: counted(4), what="lines of the old and the new file read")
        log.write_text(error_line(5))  # copytruncate: the same file, now shorter than what was read
        await eventually(lambda: counted(5), what="read again after truncation")


def test_a_pairing_marks_the_next_open_as_a_new_login() -> None:
    reader = BaileysLogReader()
    opened = {"level": 30, "time": "2026-11-25T03:52:28.512Z", "msg": "opened connection to WA"}
    paired = {
        "level": 30,
        "time": "2026-11-25T03:52:20.000Z",
        "msg": "pairing configured successfully, expect to restart the connection...",
    }
    events = reader.feed("".join(bound(record) + "\n" for record in (paired, opened, opened)))
    assert [event.get("isNewLogin") for event in events] == [True, None]


def test_a_one_off_read_binds_no_port_and_says_what_it_left_to_the_backend(tmp_path: Path) -> None:
    """Next to a `serve` on the default port (held here by a socket of the test's own), a one-off read runs
    without --listen: no listener, the summary, and an action line that says the socket was left to the backend."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 9464))
        holder.listen()
    except OSError:
        pass  # something else holds it already: the same situation
    log = tmp_path / "backend.log"
    log.write_text(bound(golden()["decrypt_fail.pkmsg_bad_mac"]["line"]) + "\n")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "ingest-logs", str(log)], capture_output=True, text=True, timeout=60
        )
    finally:
        holder.close()
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line.startswith("{")]
    assert any(line.get("msg", "").startswith("running without a listener") for line in lines)
    assert not any(line.get("msg") == "serving" for line in lines)
    (healed,) = [line for line in lines if line.get("msg") == "session healed"]
    assert healed["socket"] == "left_to_runtime"
    assert [line["ingest"]["events"] for line in lines if "ingest" in line] == [1]


def test_the_first_unattributed_line_names_the_bindings_it_lacks(tmp_path: Path) -> None:
    """The adapter README's logger once bound only organizationPhoneId: every line was unattributed, silently."""
    log = tmp_path / "backend.log"
    line = golden()["decrypt_fail.pkmsg_bad_mac"]["line"]
    log.write_text("".join(json.dumps({"level": 50, "organizationPhoneId": 42, **line}) + "\n" for _ in range(3)))
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "ingest-logs", str(log)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    hints = [json.loads(x)["msg"] for x in result.stderr.splitlines() if "names no session" in x]
    assert len(hints) == 1, result.stderr  # said once, not once a line
    assert "no `organizationId`, `phoneJid` bindings" in hints[0] and "pino().child({ organizationId" in hints[0]
    (done,) = [json.loads(x)["ingest"] for x in result.stdout.splitlines() if x.startswith('{"ingest"')]
    assert done["unattributed"] == 3


async def test_a_stopped_follow_prints_its_summary(tmp_path: Path) -> None:
    log = tmp_path / "backend.log"
    log.write_text(bound(golden()["decrypt_fail.pkmsg_bad_mac"]["line"]) + "\n")
    async with ingesting(str(log), "--follow") as state:
        await eventually(lambda: state["base"] is not None, what="serving")

        async def read_one() -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"{state['base']}/metrics") as response:
                return 'whatsapp_decrypt_errors_total{kind="bad_mac",organization_id="7"} 1.0' in await response.text()

        await eventually(read_one, what="the line read")
        state["process"].send_signal(signal.SIGTERM)
        await state["process"].wait()
    assert state["process"].returncode == 0
    done = summary(state)
    assert done is not None and done["events"] == 1 and done["lines"] == 1


def _as_of_now(record: dict[str, Any], shift_ms: int, phone: SeededPhone) -> dict[str, Any]:
    """A captured line as the backend would write it now, for the seeded phone: every instant moved by `shift_ms`."""
    moved = dict(record, time=record["time"] + shift_ms, organizationId=phone.organization_id,
                 organizationPhoneId=phone.organization_phone_id, phoneJid=phone.phone_jid)  # fmt: skip
    if "timeEnforcementEnds" in moved:
        ends = datetime.fromisoformat(moved["timeEnforcementEnds"].replace("Z", "+00:00"))
        moved["timeEnforcementEnds"] = (ends + timedelta(milliseconds=shift_ms)).isoformat()
    if isinstance(moved.get("payload"), dict) and "cycle_end_timestamp" in moved["payload"]:
        cycle_end = int(moved["payload"]["cycle_end_timestamp"]) + shift_ms // 1000
        moved["payload"] = dict(moved["payload"], cycle_end_timestamp=str(cycle_end))
    return moved


async def test_restriction_lines_of_a_real_baileys_log_reach_the_timeline(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The lines the real makeWASocket logged for a time lock (set, lifted), a message cap and refusals (479, 463):
    read by `ingest-logs` into the number's timeline, read back with SQL; nothing closes the session."""
    phone = await add_phone(db, 7, "15550001111")
    records = [json.loads(line) for line in FIXTURES.joinpath("restrictions-7.0.0-rc14.log").read_text().splitlines()]
    shift = int(time.time() * 1000) - records[0]["time"]
    log = tmp_path / "backend.log"
    log.write_text("".join(json.dumps(_as_of_now(r, shift, phone)) + "\n" for r in records))
    async with ingesting(str(log), "--database-url", database) as state:
        await eventually(lambda: state["process"].returncode is not None, what="ingest-logs finished")
    assert state["process"].returncode == 0, state["lines"]
    held = await db.fetch(
        "SELECT kind, code, detail, until - now() AS left FROM wa_sidecar.restrictions"
        " WHERE organization_phone_id = $1 AND until > now() ORDER BY kind",
        phone.organization_phone_id,
    )
    assert [(r["kind"], r["code"]) for r in held] == [("ack_463", 463), ("ack_479", 479), ("message_cap", None)]
    assert held[2]["detail"] == "CAPPED 250/250 new chats this cycle"
    assert timedelta(hours=23) < held[2]["left"] < timedelta(hours=25), "until the capping cycle's end"
    assert timedelta(minutes=50) < held[0]["left"] < timedelta(hours=1, seconds=10), "held for an hour after it"
    timeline = await db.fetch(
        "SELECT active, until, detail FROM wa_sidecar.restriction_history"
        " WHERE organization_phone_id = $1 AND kind = 'reachout_timelock' ORDER BY seq",
        phone.organization_phone_id,
    )
    assert [(r["active"], r["detail"]) for r in timeline] == [(True, "BIZ_QUALITY"), (False, None)]
    assert (
        await db.fetchval(
            "SELECT count(*) FROM wa_sidecar.closures WHERE organization_phone_id = $1", phone.organization_phone_id
        )
        == 0
    )


async def test_a_debug_log_of_the_real_socket_measures_a_recovered_and_a_lost_message(tmp_path: Path) -> None:
    """The debug-level lines the real makeWASocket logged for two tampered messages (Bad MAC, a retry receipt each)
    and the genuine re-send of one (`sending receipt for messages` names its id): with --message-ids one is
    recovered and the other lost after --loss-deadline (the stock Prometheus parser reads the counters); without
    it no message is tracked (an info-level log shows no recovery)."""
    from tests.integration.test_restrictions import samples

    log = tmp_path / "backend.log"
    log.write_text(FIXTURES.joinpath("loss-debug-7.0.0-rc14.log").read_text())
    org = (("organization_id", "4"),)
    async with ingesting(str(log), "--follow", "--message-ids", "--loss-deadline", "1") as state:
        await eventually(lambda: state["base"] is not None, what="serving")

        async def lost() -> bool:
            return (await samples(state["base"], "whatsapp_messages_lost_total")).get(org) == 1.0

        await eventually(lost, what="the message never re-sent lost after the deadline")
        assert (await samples(state["base"], "whatsapp_messages_undecryptable_total")).get(org) == 2.0
        recovered = await samples(state["base"], "whatsapp_messages_recovered_total")
        assert recovered == {(("organization_id", "4"), ("via", "retry")): 1.0}
    async with ingesting(str(log), "--follow") as state:
        await eventually(lambda: state["base"] is not None, what="serving")

        async def counted() -> bool:
            errors = await samples(state["base"], "whatsapp_decrypt_errors_total")
            return sum(errors.values()) == 2.0

        await eventually(counted, what="both failures counted as errors")
        assert (await samples(state["base"], "whatsapp_messages_undecryptable_total")).get(org, 0.0) == 0.0
