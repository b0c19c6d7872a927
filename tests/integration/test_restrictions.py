"""Restrictions (`account.restriction`) and runtime versions (`runtime.info`) through the real server: the
per-session gauge and the counter read with the stock Prometheus parser, one signed webhook per change (the stock
`standardwebhooks` verifier), the timeline as PostgreSQL holds it (read by SQL) and through the API, a time lock
that ends by itself, versions and advisories counted per session and forgotten when the sessions go, fleet mode
(the event on one replica, the timeline read on another), bad input answered 400 naming the field. A restriction
never logs out and never deletes a key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.client import RuntimeClient, account_restriction, connection_update
from tests.integration.test_notifications import SECRET, owners_file
from tests.receiver import receiving
from tests.replicas import replicas
from tests.seed import add_phone, keys_of, phone_row
from tests.server import Served, serving, sidecar_config
from tests.waiting import eventually

TOKEN = "operator-token-long-enough"


async def request(served: Served | str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    base = served if isinstance(served, str) else served.base
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http, http.request(method, base + path, json=body, headers=headers) as r:
        return r.status, await r.json()


async def post(served: Served, *events: dict[str, Any]) -> None:
    status, body = await request(served, "POST", "/v1/events", list(events))
    assert status == 202, body


async def samples(served: Served | str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The family's samples as the stock parser reads them, by their sorted labels (`served`: a server or its base
    URL)."""
    base = served if isinstance(served, str) else served.base
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as response:
        text = await response.text()
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def restricted_kinds(found: dict[tuple[tuple[str, str], ...], float], phone_id: int) -> set[str]:
    kinds = set()
    for labels, value in found.items():
        named = dict(labels)
        if named["organization_phone_id"] == str(phone_id) and value == 1:
            kinds.add(named["kind"])
    return kinds


@pytest.mark.parametrize("store", ["postgres", "embedded"])
async def test_a_restriction_sets_the_gauge_notifies_once_and_lifting_clears_both(
    store: str, database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    keys_before = await keys_of(db, phone)
    url = database if store == "postgres" else None
    async with receiving(SECRET) as receiver:
        config = sidecar_config(url, owners_file=owners_file(tmp_path, receiver.url), webhook_backoff_initial=0.05)
        async with serving(config) as served:
            await post(served, connection_update(1, pid, jid, "open"))
            ack = account_restriction(1, pid, jid, "ack_463", code=463, detail="account restricted or missing tctoken")
            await post(served, ack)
            await eventually(lambda: receiver.events == ["session.restricted"], what="the restricted webhook")
            assert restricted_kinds(await samples(served, "whatsapp_session_restricted"), pid) == {"ack_463"}
            total = await samples(served, "whatsapp_session_restrictions_total")
            assert total == {(("kind", "ack_463"), ("organization_id", "1")): 1.0}
            await post(served, ack, ack)  # in force already: nothing new
            forbidden = account_restriction(1, pid, jid, "forbidden", code=403)
            await post(served, forbidden)  # a second kind on the same number
            await eventually(lambda: len(receiver.received) == 2, what="the second restriction's webhook")
            assert restricted_kinds(await samples(served, "whatsapp_session_restricted"), pid) == {
                "ack_463",
                "forbidden",
            }
            status, session = await request(served, "GET", f"/v1/sessions/{pid}")
            assert status == 200 and session["state"] == "active"
            assert [r["kind"] for r in session["restrictions"]["current"]] == ["ack_463", "forbidden"]
            await post(served, account_restriction(1, pid, jid, "ack_463", active=False))
            await eventually(lambda: len(receiver.received) == 3, what="the lifted webhook")
            assert restricted_kinds(await samples(served, "whatsapp_session_restricted"), pid) == {"forbidden"}
            await post(served, account_restriction(1, pid, jid, "ack_463", active=False))  # lifted already
            status, listed = await request(served, "GET", "/v1/restrictions?active=false")
            assert status == 200
            history = [(r["kind"], r["active"]) for r in listed["restrictions"]]
            assert history == [("ack_463", False), ("forbidden", True), ("ack_463", True)]
            if store == "postgres":
                rows = await db.fetch("SELECT kind, code FROM wa_sidecar.restrictions WHERE organization_phone_id = $1",
                                      pid)  # fmt: skip
                assert [(r["kind"], r["code"]) for r in rows] == [("forbidden", 403)]
                assert await db.fetchval("SELECT count(*) FROM wa_sidecar.restriction_history") == 3
            assert (await request(served, "GET", f"/v1/sessions/{pid}/stats"))[1]["isHealthy"] is True
    assert receiver.events == ["session.restricted", "session.restricted", "session.restriction_lifted"]
    assert receiver.forged == 0
    first, second, lifted = receiver.received
    assert first["restriction"]["kind"] == "ack_463" and first["restriction"]["code"] == 463
    assert first["reason"] == "ack_463" and first["stats"]["isHealthy"] is True
    assert second["restriction"]["kind"] == "forbidden"
    assert lifted["restriction"] == {**lifted["restriction"], "kind": "ack_463", "active": False}
    assert phone.bare not in str(receiver.received)
    # Never a logout, never a key deletion.
    assert await keys_of(db, phone) == keys_before
    assert (await phone_row(db, phone))["status"] != "logged_out"


async def test_a_time_lock_past_its_until_ends_by_itself(database: str, db: asyncpg.Connection, tmp_path: Path) -> None:
    phone = await add_phone(db, 3, "79005550101")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with receiving(SECRET) as receiver:
        config = sidecar_config(database, owners_file=owners_file(tmp_path, receiver.url), webhook_backoff_initial=0.05)
        async with serving(config) as served:
            until = datetime.now(UTC) + timedelta(seconds=3)
            await post(served, account_restriction(3, pid, jid, "reachout_timelock", until=until))
            await eventually(lambda: receiver.events == ["session.restricted"], what="the time lock's webhook")
            assert restricted_kinds(await samples(served, "whatsapp_session_restricted"), pid) == {"reachout_timelock"}
            row = await db.fetchrow("SELECT until FROM wa_sidecar.restrictions WHERE organization_phone_id = $1", pid)
            assert row is not None and abs((row["until"] - until).total_seconds()) < 0.001
            await eventually(
                lambda: receiver.events == ["session.restricted", "session.restriction_lifted"],
                what="the lock lifted by itself once its until passed",
            )
            assert datetime.now(UTC) >= until
            assert restricted_kinds(await samples(served, "whatsapp_session_restricted"), pid) == set()
            assert await db.fetchval("SELECT count(*) FROM wa_sidecar.restrictions") == 0
            status, listed = await request(served, "GET", "/v1/restrictions")
            assert status == 200 and listed == {"restrictions": [], "next": None}


async def test_the_fleets_restrictions_are_paged_and_filtered(database: str, db: asyncpg.Connection) -> None:
    phones = [await add_phone(db, org, f"7900777{index:04d}") for index, org in enumerate((1, 1, 2))]
    async with serving(sidecar_config(database, api_token=TOKEN)) as served:
        for phone in phones:
            await post(served, account_restriction(phone.organization_id, phone.organization_phone_id, phone.phone_jid,
                                                   "message_cap"))  # fmt: skip
        await post(served, account_restriction(1, phones[0].organization_phone_id, phones[0].phone_jid, "ack_479"))

        async def four() -> bool:
            return int(await db.fetchval("SELECT count(*) FROM wa_sidecar.restrictions")) == 4

        await eventually(four, what="four restrictions stored")
        table = [(r["organization_phone_id"], r["kind"]) for r in await db.fetch(
            "SELECT organization_phone_id, kind FROM wa_sidecar.restrictions ORDER BY organization_phone_id, kind"
        )]  # fmt: skip
        seen: list[tuple[int, str]] = []
        cursor: str | None = None
        while True:
            query = "?limit=1" + (f"&cursor={cursor}" if cursor else "")
            status, page = await request(served, "GET", "/v1/restrictions" + query)
            assert status == 200, page
            seen += [(r["organizationPhoneId"], r["kind"]) for r in page["restrictions"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == table
        _, by_org = await request(served, "GET", "/v1/restrictions?organizationId=2")
        assert [r["organizationPhoneId"] for r in by_org["restrictions"]] == [phones[2].organization_phone_id]
        _, by_kind = await request(served, "GET", "/v1/restrictions?kind=ack_479")
        assert [r["organizationPhoneId"] for r in by_kind["restrictions"]] == [phones[0].organization_phone_id]
        for query, field in (
            ("active=yes", "active"),
            ("kind=shadowban", "kind"),
            ("limit=0", "limit"),
            ("organizationId=x", "organizationId"),
            ("cursor=bm90LWEtY3Vyc29y", "cursor"),
        ):
            status, answer = await request(served, "GET", f"/v1/restrictions?{query}")
            assert status == 400 and answer["details"][0]["field"] == field, (query, answer)


async def test_bad_restrictions_get_a_400_naming_the_field(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001119999")
    good = account_restriction(1, phone.organization_phone_id, phone.phone_jid, "temporary_ban")
    async with serving(sidecar_config(database, api_token=TOKEN)) as served:
        for change, field in (
            ({"kind": "shadowban"}, "kind"),
            ({"until": "2026-12-03T00:00:00"}, "until"),
            ({"detail": "a\x00b"}, "detail"),
            ({"detail": "x" * 1025}, "detail"),
            ({"active": "yes"}, "active"),
            ({"code": -1}, "code"),
        ):
            status, answer = await request(served, "POST", "/v1/events", [good, {**good, **change}])
            assert status == 400, (change, answer)
            assert [(d["index"], d["field"]) for d in answer["details"]] == [(1, field)], answer
        assert await db.fetchval("SELECT count(*) FROM wa_sidecar.restrictions") == 0  # nothing half-applied
        status, info = await request(served, "POST", "/v1/events", [{"type": "runtime.info", "library": "a b"}])
        assert status == 400 and info["details"][0]["field"] == "library"


async def test_versions_and_advisories_are_counted_per_session_and_forgotten_when_they_go(
    database: str, db: asyncpg.Connection
) -> None:
    old = [await add_phone(db, 1, f"7900888{index:04d}") for index in range(2)]
    new = await add_phone(db, 1, "79008889999")
    async with serving(sidecar_config(database, api_token=TOKEN)) as served:
        affected = RuntimeClient(served.ws_url, TOKEN, library=("baileys", "7.0.0-rc.9"), reconnect_initial=0.05)
        fixed = RuntimeClient(served.ws_url, TOKEN, library=("@whiskeysockets/baileys", "7.0.0-rc14"))
        async with affected, fixed:
            for phone in old:
                await affected.send(connection_update(1, phone.organization_phone_id, phone.phone_jid, "open"))
            await fixed.send(connection_update(1, new.organization_phone_id, new.phone_jid, "open"))
            await affected.flush()
            await fixed.flush()

            async def counted() -> bool:
                sessions = await samples(served, "whatsapp_runtime_sessions")
                return sessions == {
                    (("library", "baileys"), ("version", "7.0.0-rc.9")): 2.0,
                    (("library", "baileys"), ("version", "7.0.0-rc14")): 1.0,
                }

            await eventually(counted, what="sessions by runtime version")
            advisory = await samples(served, "whatsapp_runtime_advisory_sessions")
            assert advisory == {(("advisory", "GHSA-qvv5-jq5g-4cgg"),): 2.0}
            await affected.stop()

            async def forgotten() -> bool:
                advisory = await samples(served, "whatsapp_runtime_advisory_sessions")
                sessions = await samples(served, "whatsapp_runtime_sessions")
                return advisory == {(("advisory", "GHSA-qvv5-jq5g-4cgg"),): 0.0} and list(sessions.values()) == [1.0]

            await eventually(forgotten, what="the affected runtime's sessions gone with its connection")


async def test_fleet_mode_the_event_on_one_replica_the_timeline_on_another(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112244")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with receiving(SECRET) as receiver:
        owners = owners_file(tmp_path, receiver.url)
        async with replicas(2, database, tmp_path, ["--owners-file", str(owners)]) as (a, b):
            ban = account_restriction(1, pid, jid, "temporary_ban", detail="banned for a while")
            await a.events([connection_update(1, pid, jid, "open"), ban])
            await eventually(lambda: receiver.events == ["session.restricted"], what="the webhook from replica a")

            async def on_b() -> bool:
                status, listed = await b.request("GET", "/v1/restrictions")
                return status == 200 and [r["kind"] for r in listed["restrictions"]] == ["temporary_ban"]

            await eventually(on_b, what="replica b reads the restriction replica a took")
            status, session = await b.request("GET", f"/v1/sessions/{pid}")
            assert status == 200 and [r["kind"] for r in session["restrictions"]["current"]] == ["temporary_ban"]
            await b.events([ban])  # the phone moved to b, which reports it again: the timeline has it
            await b.events([account_restriction(1, pid, jid, "temporary_ban", active=False)])
            await eventually(lambda: len(receiver.received) == 2, what="the lift's webhook")
    assert receiver.events == ["session.restricted", "session.restriction_lifted"]
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.restriction_history") == 2
