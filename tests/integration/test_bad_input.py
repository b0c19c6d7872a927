"""Bad input gets a 4xx naming the field (or an error reply on the runtime link), never a 500, never a 200 that
changed nothing; and no phone number reaches a log line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from sidecar.client import connection_update, decrypt_error
from tests.monitoring import free_port, run_tool, wait_ready
from tests.seed import add_phone, keys_of, phone_row, refuse_key_deletes
from tests.server import serving, sidecar_config
from tests.waiting import eventually

TOKEN = "operator-token"
HUGE = "9" * 5000


async def raw_post(base: str, path: str, body: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as http, http.post(base + path, data=body.encode(), headers=sent) as response:
        return response.status, await response.json()


async def test_texts_postgres_cannot_store_are_refused_and_change_nothing(
    database: str, db: asyncpg.Connection
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid = phone.organization_phone_id
    async with serving(sidecar_config(database, api_token=TOKEN)) as served:
        await raw_post(served.base, "/v1/events", json.dumps([connection_update(1, pid, phone.phone_jid, "open")]))
        for reason in ("Maintenance\u0000restart", "Maintenance \ud800"):
            body = json.dumps({"reason": reason})  # \\u escapes: JSON carries them, PostgreSQL cannot
            status, answer = await raw_post(served.base, f"/v1/sessions/{pid}/close", body)
            assert status == 400 and answer["details"][0]["field"] == "reason", answer
        for path, request in (
            ("/v1/breaker", {"action": "trip", "operator": "on\u0000call"}),
            ("/v1/mode", {"mode": "observe", "operator": "on\ud800call"}),
        ):
            status, answer = await raw_post(served.base, path, json.dumps(request))
            assert status == 400 and answer["details"][0]["field"] == "operator", answer
        bad = decrypt_error(1, pid, phone.phone_jid, "Bad MAC\u0000")
        status, answer = await raw_post(served.base, "/v1/events", json.dumps([bad]))
        assert status == 400 and answer["details"][0]["field"] == "error"
        status, answer = await raw_post(served.base, f"/v1/sessions/{pid}/close", json.dumps({"reason": "Planned"}))
        assert status == 200 and answer["alreadyClosed"] is False  # the refused ones left it open
    assert await keys_of(db, phone) == set()
    assert (await phone_row(db, phone))["status"] == "logged_out"


async def test_huge_integers_are_refused_on_http_and_the_link_keeps_the_connection(database: str) -> None:
    jid = "79001112233@s.whatsapp.net"
    async with serving(sidecar_config(database, api_token=TOKEN)) as served:
        frame = (
            f'[{{"type":"decrypt.error","organizationId":{HUGE},"organizationPhoneId":1,'
            f'"phoneJid":"{jid}","error":"Bad MAC"}}]'
        )
        for path, body in (
            ("/v1/events", frame),
            ("/v1/sessions/1/close", f'{{"reason": "x", "n": {HUGE}}}'),
            ("/v1/mode", f'{{"mode": "observe", "operator": "me", "observeOrganizations": [{HUGE}]}}'),
        ):
            status, answer = await raw_post(served.base, path, body)
            assert status == 400 and "digits" in answer["error"], (path, answer)
        async with aiohttp.ClientSession() as http, http.ws_connect(served.ws_url) as ws:
            await ws.send_str(frame)
            reply = await ws.receive_json(timeout=10)
            assert reply["type"] == "error" and "digits" in reply["error"]
            await ws.send_str(json.dumps(decrypt_error(1, 7, jid, "Bad MAC")))  # the same connection goes on
            await eventually(lambda: served.components.runtime.session(7) is not None, what="applied")


async def test_ids_and_numbers_take_ascii_digits_and_jids_no_trailing_newline(database: str) -> None:
    async with serving(sidecar_config(database)) as served, aiohttp.ClientSession() as http:
        for path, field in (
            ("/v1/sessions/%C2%B2/stats", "organizationPhoneId"),  # '²' passes str.isdigit()
            (f"/v1/sessions/{HUGE}/stats", "organizationPhoneId"),
            ("/v1/sessions/%D9%A1%D9%A2/stats", "organizationPhoneId"),  # Arabic-Indic 12
            ("/v1/notifications?limit=%C2%B2", "limit"),
        ):
            async with http.get(served.base + path) as response:
                body = await response.json()
                assert response.status == 400 and body["details"][0]["field"] == field, (path, body)
        event = decrypt_error(1, 5, "79001112233@s.whatsapp.net\n", "Bad MAC")
        async with http.post(served.base + "/v1/events", json=[event]) as response:
            body = await response.json()
            assert response.status == 400 and body["details"][0]["field"] == "phoneJid"
        traced = {
            **decrypt_error(1, 5, "79001112233@s.whatsapp.net", "Bad MAC"),
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n",
        }
        async with http.post(served.base + "/v1/events", json=[traced]) as response:
            body = await response.json()
            assert response.status == 400 and body["details"][0]["field"] == "traceparent"


async def test_an_authorization_header_that_is_not_text_is_a_401(database: str) -> None:
    async with serving(sidecar_config(database, api_token=TOKEN)) as served:
        port = int(served.base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"reason": "x"}'
        writer.write(
            b"POST /v1/sessions/1/close HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


async def test_database_backed_reads_answer_503_with_the_reason_while_it_is_away() -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    async with serving(sidecar_config(unreachable), wait_restored=False) as served, aiohttp.ClientSession() as http:
        for path in ("/v1/notifications", "/v1/sessions/1/stats"):
            async with http.get(served.base + path) as response:
                body = await response.json()
                assert response.status == 503 and "unreachable" in body["error"], (path, body)


async def test_a_slow_body_gets_408(database: str) -> None:
    async with serving(sidecar_config(database, request_body_timeout=0.5)) as served:
        port = int(served.base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        writer.write(head + b"[")
        await writer.drain()  # and nothing more: the client stalls
        answer = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


async def test_check_config_refuses_what_serve_would_refuse() -> None:
    code, output = await run_tool(sys.executable, "-m", "sidecar", "check-config", "--listen", "0.0.0.0:9999")
    assert code == 2 and "exposure" in output, output
    code, output = await run_tool(sys.executable, "-m", "sidecar", "check-config", "--listen", "127.0.0.1:9999")
    assert code == 0, output


def test_no_phone_number_in_the_action_log(tmp_path: Path) -> None:
    """The heal line names the scope and how many prefixes, not the peer's number inside them."""
    import logging

    from sidecar.rules.policy import Heal, KeyScope
    from sidecar.rules.records import PhoneRef
    from sidecar.telemetry.action_log import ActionLog

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.actions")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    heal = Heal(KeyScope.PEER_SESSION, ("session-15550002222.", "session-15550002222_"))
    ActionLog(logger).healed(PhoneRef(1, 2, "79001112233"), heal, 2, "ok", "cleared", 0.01)
    [record] = records
    text = record.getMessage() + json.dumps(getattr(record, "fields", {}))
    assert "15550002222" not in text and "79001112233" not in text
    assert record.__dict__["fields"]["keyPrefixCount"] == 2


async def test_a_client_trickling_its_headers_is_disconnected(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    argv = [sys.executable, "-m", "sidecar", "serve", "--listen", f"127.0.0.1:{port}", "--request-header-timeout", "1"]
    process = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz", process)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = asyncio.get_running_loop().time()
        writer.write(b"GET /v1/sessions HTTP/1.1\r\n")
        disconnected = False
        for index in range(40):  # a header line every 0.25 s: the head would take 10 s
            await asyncio.sleep(0.25)  # the client's pace, not a wait for an outcome
            try:
                writer.write(f"X-Slow-{index}: 1\r\n".encode())
                await writer.drain()
            except ConnectionError:
                disconnected = True
                break
            if reader.at_eof():
                disconnected = True
                break
        elapsed = asyncio.get_running_loop().time() - started
        writer.close()
        assert disconnected and elapsed < 5, elapsed
    finally:
        process.terminate()
        await process.wait()
        log.close()


async def test_an_operator_close_whose_database_steps_fail_answers_503_and_a_retry_closes(
    database: str, db: asyncpg.Connection
) -> None:
    """Fleet mode (a database): the claim is given back, so the retry is a close, not `alreadyClosed`."""
    phone = await add_phone(db, 1, "79001112233")
    pid = phone.organization_phone_id
    await refuse_key_deletes(db)
    async with serving(sidecar_config(database, api_token=TOKEN, socket_end_timeout=0.2)) as served:
        await raw_post(served.base, "/v1/events", json.dumps([connection_update(1, pid, phone.phone_jid, "open")]))
        status, answer = await raw_post(served.base, f"/v1/sessions/{pid}/close", json.dumps({"reason": "Planned"}))
        assert status == 503 and answer["details"][0]["field"] == "authKeys", answer
        assert "read-only" in answer["details"][0]["problem"] and "retry" in answer["error"]
        await db.execute("DROP TRIGGER refuse_delete ON baileys_auth")
        status, answer = await raw_post(served.base, f"/v1/sessions/{pid}/close", json.dumps({"reason": "Planned"}))
        assert status == 200 and answer["alreadyClosed"] is False and answer["steps"]["authKeys"] == "ok", answer
    assert await keys_of(db, phone) == set()


async def test_bytes_the_http_parser_refuses_get_a_400_and_one_warning_line_each(tmp_path: Path) -> None:
    """Non-UTF-8 and NUL bytes in a header, the query or the path of a route this API serves: aiohttp answers 400
    before any handler; the log has one warning per request, no error and no traceback a client could fill it with."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", "--listen", f"127.0.0.1:{port}",
            stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            await wait_ready(f"http://127.0.0.1:{port}/healthz", process)
            requests = (b"/v1/sessions/1 HTTP/1.1\r\nX-A: \xff\xfe\x00", b"/v1/sessions?state=\xff HTTP/1.1",
                        b"/v1/sessions/\xff\xfe HTTP/1.1")  # fmt: skip
            for request in requests:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET " + request + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
                status = await reader.readline()
                writer.close()
                assert status.split()[1] == b"400", status
        finally:
            process.terminate()
            await process.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line["msg"].startswith("malformed HTTP request refused (400)")]
    assert [line["level"] for line in refused] == ["warning"] * 3, lines
    assert not [line for line in lines if line["level"] == "error" or "exception" in line], lines
