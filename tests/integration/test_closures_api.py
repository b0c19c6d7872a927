"""`GET /v1/closures`: the closure log through the API, filtered and paginated, in PostgreSQL (compared with the
table read by SQL) and in the embedded store; bad query parameters answered 400 naming the parameter."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import pytest

from sidecar.client import connection_update, decrypt_error
from tests.seed import add_phone
from tests.server import Served, serving, sidecar_config
from tests.waiting import eventually

TOKEN = "operator-token-long-enough"
BAD_DECRYPT = "Error: error:1C800064:Provider routines::bad decrypt"


async def get(served: Served, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(served.base + "/v1/closures", params=query) as response:
        return response.status, await response.json()


async def post(served: Served, path: str, body: Any) -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http, http.post(served.base + path, json=body, headers=headers) as response:
        return response.status


async def close_three(served: Served, phones: list[tuple[int, int, str]]) -> None:
    (org_a, a, jid_a), (org_b, b, jid_b), (_, c, _) = phones
    assert await post(served, "/v1/events", [connection_update(o, p, j, "open") for o, p, j in phones]) == 202
    assert await post(served, "/v1/events", [decrypt_error(org_a, a, jid_a, "Bad MAC")] * 3) == 202
    assert (
        await post(served, "/v1/events", [decrypt_error(org_b, b, jid_b, BAD_DECRYPT, source="app-state")] * 5) == 202
    )
    assert await post(served, f"/v1/sessions/{c}/close", {"reason": "maintenance"}) == 200

    async def three() -> bool:
        status, body = await get(served, {})
        return status == 200 and len(body["closures"]) == 3

    await eventually(three, what="three closures listed")


async def pages(served: Served, query: dict[str, str]) -> list[str]:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        status, body = await get(served, {**query, **({"cursor": cursor} if cursor else {})})
        assert status == 200, body
        seen += [closure["closureId"] for closure in body["closures"]]
        cursor = body["next"]
        if cursor is None:
            return seen


async def test_closures_are_listed_filtered_and_paged_as_the_table_holds_them(
    database: str, db: asyncpg.Connection
) -> None:
    phones = [await add_phone(db, org, f"7900555{index:04d}") for index, org in enumerate((1, 1, 2))]
    ids = [(p.organization_id, p.organization_phone_id, p.phone_jid) for p in phones]
    async with serving(sidecar_config(database, api_token=TOKEN)) as served:
        await close_three(served, ids)
        table = [row["closure_id"] for row in await db.fetch(
            "SELECT closure_id FROM wa_sidecar.closures ORDER BY started_at DESC, closure_id DESC"
        )]  # fmt: skip
        assert len(table) == 3
        _, body = await get(served, {})
        assert [closure["closureId"] for closure in body["closures"]] == table and body["next"] is None
        assert await pages(served, {"limit": "1"}) == table  # one per page, every one once, in order
        _, by_org = await get(served, {"organizationId": "1"})
        assert {c["organizationPhoneId"] for c in by_org["closures"]} == {ids[0][1], ids[1][1]}
        _, forced = await get(served, {"reason": "forced"})
        assert [c["organizationPhoneId"] for c in forced["closures"]] == [ids[2][1]]
        _, decrypts = await get(served, {"reason": "bad_decrypt_limit", "organizationPhoneId": str(ids[1][1])})
        assert len(decrypts["closures"]) == 1 and decrypts["closures"][0]["badDecryptErrors"] == 5
        _, later = await get(served, {"since": "2999-01-01T00:00:00Z"})
        _, earlier = await get(served, {"until": "2000-01-01T00:00:00Z"})
        assert later["closures"] == [] and earlier["closures"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"organizationId": "-3"}, "organizationId"),
        ({"reason": "tired"}, "reason"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-12-01T10:00:00"}, "until"),  # no time zone
        ({"since": "2026-12-01T10:00:00\x00Z"}, "since"),  # a NUL the date parser would skip
        ({"cursor": "not-a-cursor"}, "cursor"),
    ],
)
async def test_a_bad_query_parameter_is_named(query: dict[str, str], field: str) -> None:
    async with serving(sidecar_config(None)) as served:
        status, body = await get(served, query)
        assert status == 400 and body["details"][0]["field"] == field, body


async def test_the_embedded_store_lists_them_too() -> None:
    ids = [
        (1, 11, "79005550011@s.whatsapp.net"),
        (1, 12, "79005550012@s.whatsapp.net"),
        (2, 13, "79005550013@s.whatsapp.net"),
    ]
    async with serving(sidecar_config(None, api_token=TOKEN)) as served:
        await close_three(served, ids)
        listed = await pages(served, {"limit": "2"})
        assert len(set(listed)) == 3
        _, by_phone = await get(served, {"organizationPhoneId": "13"})
        assert [c["reason"] for c in by_phone["closures"]] == ["forced"]
