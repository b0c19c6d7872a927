"""`POST /v1/events` with an `Idempotency-Key`: a retry is answered as the first post and applied once, through
any replica of a fleet (the key is in PostgreSQL) and in the embedded mode (in memory). Counts read with SQL and
the stats API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from sidecar.client import decrypt_error
from tests.replicas import API_TOKEN, replicas
from tests.seed import add_phone
from tests.server import serving, sidecar_config

HEADER = "Idempotency-Key"


async def post(base: str, events: list[dict[str, Any]], key: str | None) -> tuple[int, dict[str, Any], str | None]:
    headers = {"Authorization": f"Bearer {API_TOKEN}", **({HEADER: key} if key is not None else {})}
    async with aiohttp.ClientSession() as http, http.post(base + "/v1/events", json=events, headers=headers) as answer:
        return answer.status, await answer.json(), answer.headers.get("Idempotent-Replayed")


async def bad_macs(db: asyncpg.Connection, phone_id: int) -> int:
    value: int = await db.fetchval(
        "SELECT bad_mac_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", phone_id
    )
    return value


async def test_a_retried_post_is_applied_once_through_either_replica(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    body = [decrypt_error(1, pid, jid, "Bad MAC")]
    async with replicas(2, database, tmp_path) as (a, b):
        assert await post(a.base, body, "retry-1") == (202, {"accepted": 1}, None)
        assert await post(b.base, body, "retry-1") == (202, {"accepted": 1}, "true")  # the answer, given again
        assert await post(a.base, body, "retry-1") == (202, {"accepted": 1}, "true")
        assert await bad_macs(db, pid) == 1
        status, answer, _ = await post(b.base, [*body, *body], "retry-1")  # the same key, another body
        assert status == 422 and answer["details"][0]["field"] == HEADER, answer
        status, answer, _ = await post(a.base, body, "two words")
        assert status == 400 and answer["details"][0]["field"] == HEADER, answer
        assert await bad_macs(db, pid) == 1
        assert (await post(b.base, body, None))[0] == 202  # without a key a retry is a second event
        assert await bad_macs(db, pid) == 2


async def test_without_a_database_the_key_is_remembered_in_memory() -> None:
    async with serving(sidecar_config(None, runtime_token=None)) as served:
        body = [decrypt_error(1, 7, "79001112233@s.whatsapp.net", "Bad MAC")]
        for _ in range(3):
            status, _, _ = await post(served.base, body, "embedded-1")
            assert status == 202
        async with aiohttp.ClientSession() as http, http.get(served.base + "/v1/sessions/7/stats") as response:
            stats = await response.json()
        assert stats["badMacErrors"] == 1
