"""The HTTP API against a real server and real PostgreSQL: stats, sessions, force close, ingest, health."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import asyncpg
from openapi_spec_validator import validate

from sidecar.client import connection_update, decrypt_error
from sidecar.http import MAX_BODY_BYTES, OPENAPI_PATH
from tests.pgcluster import free_port
from tests.seed import add_phone, keys_of, phone_row
from tests.server import serving, sidecar_config
from tests.waiting import eventually

API = "api-secret-for-tests"
RUNTIME = "runtime-secret"
AUTH = {"Authorization": f"Bearer {API}"}
RUNTIME_AUTH = {"Authorization": f"Bearer {RUNTIME}"}


async def test_stats_sessions_and_force_close(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    config = sidecar_config(database, api_token=API, runtime_token=RUNTIME)
    async with serving(config) as served, aiohttp.ClientSession(served.base) as http:
        events = [connection_update(1, pid, jid, "open")] + [decrypt_error(1, pid, jid, "Bad MAC")] * 2
        events.append(decrypt_error(1, pid, jid, "bad decrypt", source="app-state"))
        async with http.post("/v1/events", json=events, headers=RUNTIME_AUTH) as response:
            assert response.status == 202
            assert await response.json() == {"accepted": 4}
        async with http.get(f"/v1/sessions/{pid}/stats") as response:
            assert response.status == 200
            assert await response.json() == {
                "badMacErrors": 2,
                "badDecryptErrors": 1,
                "maxBadMacErrors": 3,
                "maxBadDecryptErrors": 5,
                "isHealthy": False,
            }
        async with http.get("/v1/sessions", params={"healthy": "false"}) as response:
            [listed] = (await response.json())["sessions"]
            assert listed["organizationPhoneId"] == pid and listed["connected"] is True
            assert listed["lastErrorAt"] is not None
        async with http.get("/v1/sessions", params={"healthy": "true"}) as response:
            assert (await response.json())["sessions"] == []

        async with http.post(f"/v1/sessions/{pid}/close", json={"reason": "Maintenance restart"}) as response:
            assert response.status == 401  # token configured, none sent
        async with http.post(f"/v1/sessions/{pid}/close", json={"reason": "  "}, headers=AUTH) as response:
            assert response.status == 400
            assert (await response.json())["details"] == [
                {"field": "reason", "problem": "must be a non-empty text saying why the session is closed"}
            ]
        async with http.post(f"/v1/sessions/{pid}/close", json={"reason": "Maintenance restart"}, headers=AUTH) as r:
            assert r.status == 200
            first = await r.json()
        async with http.post(f"/v1/sessions/{pid}/close", json={"reason": "Maintenance restart"}, headers=AUTH) as r:
            assert r.status == 200
            second = await r.json()
    assert first["alreadyClosed"] is False
    assert (first["reason"], first["trigger"], first["detail"]) == ("forced", "operator", "Maintenance restart")
    assert (first["badMacErrors"], first["badDecryptErrors"]) == (2, 1)
    assert first["socket"] == "unreachable"  # the events came over HTTP: no runtime connection owns the session
    assert first["keysDeleted"] > 0
    assert second["alreadyClosed"] is True and second["closureId"] == first["closureId"]
    assert await keys_of(db, phone) == set()


async def test_force_close_is_disabled_without_an_api_token(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    async with serving(sidecar_config(database)) as served, aiohttp.ClientSession(served.base) as http:
        await http.post("/v1/events", json=connection_update(1, phone.organization_phone_id, phone.phone_jid, "open"))
        async with http.post(f"/v1/sessions/{phone.organization_phone_id}/close", json={"reason": "x"}) as response:
            assert response.status == 403
            assert "WA_SIDECAR_API_TOKEN" in (await response.json())["error"]
        assert served.components.runtime.session(phone.organization_phone_id) is not None


async def test_errors_are_json_with_the_field_named(database: str) -> None:
    async with serving(sidecar_config(database, api_token=API)) as served, aiohttp.ClientSession(served.base) as http:
        async with http.get("/v1/sessions/4242/stats") as response:
            assert response.status == 404
            assert "4242" in (await response.json())["error"]
        async with http.get("/v1/sessions/abc/stats") as response:
            assert response.status == 400
            assert (await response.json())["details"][0]["field"] == "organizationPhoneId"
        async with http.post("/v1/sessions/4242/close", json={"reason": "x"}, headers=AUTH) as response:
            assert response.status == 404
        async with http.post("/v1/sessions/4242/close", data="[1]", headers=AUTH) as response:
            assert response.status == 400
        async with http.get("/v1/nowhere") as response:
            assert response.status == 404 and (await response.json())["error"] == "Not Found"
        async with http.delete("/v1/sessions") as response:
            assert response.status == 405 and "error" in await response.json()
        async with http.get("/v1/sessions", params={"state": "weird"}) as response:
            assert response.status == 400
        valid = decrypt_error(1, 7, "79001112233@s.whatsapp.net", "Bad MAC")
        bad_batch = [valid, {**valid, "organizationPhoneId": -1}, {**valid, "type": "nope"}]
        async with http.post("/v1/events", json=bad_batch) as response:
            assert response.status == 400
            details = (await response.json())["details"]
            assert {(d["index"], d["field"]) for d in details} == {(1, "organizationPhoneId"), (2, "type")}
        assert served.components.runtime.session(7) is None  # nothing of the batch was applied
        async with http.post("/v1/sessions/4242/close", data=b"\xfa\xc9", headers=AUTH) as response:
            assert response.status == 400 and "UTF-8" in (await response.json())["error"]
        async with http.post("/v1/events", data="[" * 100_000) as response:
            assert response.status == 400
        async with http.post("/v1/events", data="{oops") as response:
            assert response.status == 400 and "not JSON" in (await response.json())["error"]
        async with http.post("/v1/events", data=b"x" * (MAX_BODY_BYTES + 1)) as response:
            assert response.status == 413
            assert "larger than" in (await response.json())["error"]


async def test_readyz_reports_an_unreachable_database() -> None:
    """One replica (coordination local): events are still counted and decided while the store is away."""
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    async with serving(sidecar_config(unreachable, coordination="local"), wait_restored=False) as served:
        async with aiohttp.ClientSession(served.base) as http:
            async with http.get("/healthz") as response:
                assert response.status == 200
            async with http.get("/readyz") as response:
                assert response.status == 503
                body = await response.json()
        await served.components.runtime.handle_bad_mac_error(1, 5, "79001112233@s.whatsapp.net")
        assert served.components.runtime.get_session_error_stats(5)["badMacErrors"] == 1
    assert body["ready"] is False and body["reason"].startswith("store unreachable")


async def test_fleet_mode_decides_nothing_while_the_database_is_unreachable() -> None:
    """Fleet mode fails closed: an event waits (in order) for the database instead of being decided alone."""
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    async with serving(sidecar_config(unreachable), wait_restored=False) as served:
        runtime = served.components.runtime
        assert runtime.decider.decides_later  # the fleet's decider
        assert await runtime.handle_bad_mac_error(1, 5, "79001112233@s.whatsapp.net") is True
        assert runtime.decider.backlog == 1 and runtime.session(5) is None
        async with aiohttp.ClientSession(served.base) as http:
            async with http.get("/readyz") as response:
                assert response.status == 503
            async with http.get("/v1/sessions/5/stats") as response:
                assert response.status == 503
                assert "unreachable" in (await response.json())["error"]


async def test_readyz_is_ready_with_a_reachable_database(database: str) -> None:
    async with serving(sidecar_config(database)) as served, aiohttp.ClientSession(served.base) as http:
        async with http.get("/readyz") as response:
            assert response.status == 200 and (await response.json())["ready"] is True
        async with http.get("/v1/openapi.json") as response:
            assert (await response.json())["openapi"].startswith("3.")


def test_the_openapi_document_is_valid() -> None:
    validate(json.loads(OPENAPI_PATH.read_text()))


async def test_schemathesis_finds_no_server_error(database: str, tmp_path: Path) -> None:
    """Property-based requests from the OpenAPI document against a live `wa-sidecar serve`."""
    port = free_port()
    # No runtime token (allowed on loopback), so schemathesis' one Authorization header reaches both kinds of route.
    env = {**os.environ, "WA_SIDECAR_API_TOKEN": API}
    server = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "sidecar", "serve", "--listen", f"127.0.0.1:{port}", "--database-url", database],
        env=env,
        stderr=(tmp_path / "server.log").open("w"),
    )
    try:
        base = f"http://127.0.0.1:{port}"

        async def up() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(up, what="sidecar serving")
        schemathesis = Path(sys.executable).parent / "schemathesis"
        checker = await asyncio.create_subprocess_exec(
            *[
                str(schemathesis),
                "run",
                base + "/v1/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--max-examples",
                "40",
                "--header",
                f"Authorization: Bearer {API}",
                "--exclude-path",
                "/v1/runtime",
                "--seed",
                "1",
                # A batch of 10,000 events for one phone is decided event by event in PostgreSQL in fleet mode
                # (about 8 s here, more on a busy CI machine): a slow answer is not what this test looks for.
                "--request-timeout",
                "60",
                # Negative cases too (the default mode "all": out-of-range and huge numbers, wrong types) and
                # strings with NUL bytes and any unicode (the default codec is utf-8): none may give a 5xx.
                "--generation-allow-x00",
                "true",
                "--generation-codec",
                "utf-8",
            ],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        output, _ = await asyncio.wait_for(checker.communicate(), 300)
        assert checker.returncode == 0, output.decode()[-8000:]
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
    assert "unhandled error" not in (tmp_path / "server.log").read_text()


async def test_one_session_and_a_logged_out_phone_stay_visible(database: str, db: asyncpg.Connection) -> None:
    """GET /v1/sessions/{id} answers for a live session and for a phone the sidecar logged out (which the list
    keeps too, as `logged_out`); an unknown one is a 404 naming it."""
    closing, staying = await add_phone(db, 1, "79001112233"), await add_phone(db, 1, "79004445566")
    async with serving(sidecar_config(database)) as served, aiohttp.ClientSession(served.base) as http:
        events = [connection_update(1, p.organization_phone_id, p.phone_jid, "open") for p in (closing, staying)]
        events += [decrypt_error(1, closing.organization_phone_id, closing.phone_jid, "Bad MAC")] * 3
        events.append(decrypt_error(1, staying.organization_phone_id, staying.phone_jid, "Bad MAC"))
        async with http.post("/v1/events", json=events) as response:
            assert response.status == 202
        await served.components.runtime.settle()
        async with http.get(f"/v1/sessions/{staying.organization_phone_id}") as response:
            live = await response.json()
        async with http.get(f"/v1/sessions/{closing.organization_phone_id}") as response:
            closed = await response.json()
        async with http.get("/v1/sessions") as response:
            listed = {s["organizationPhoneId"]: s["state"] for s in (await response.json())["sessions"]}
        async with http.get("/v1/sessions", params={"state": "logged_out"}) as response:
            logged_out = [s["organizationPhoneId"] for s in (await response.json())["sessions"]]
        async with http.get("/v1/sessions/999999") as response:
            assert response.status == 404
            assert "999999" in json.dumps(await response.json())
    assert (live["state"], live["connected"], live["badMacErrors"], live["isHealthy"]) == ("active", True, 1, True)
    assert (closed["state"], closed["connected"], closed["badMacErrors"]) == ("logged_out", False, 0)
    assert closed["loggedOutAt"] is not None
    assert listed == {staying.organization_phone_id: "active", closing.organization_phone_id: "logged_out"}
    assert logged_out == [closing.organization_phone_id]
    assert (await phone_row(db, closing))["status"] == "logged_out"  # what the API says, PostgreSQL says
