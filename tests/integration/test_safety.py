"""Fleet safety through the real app: circuit breaker, observe mode, logouts that stick (real PostgreSQL,
real SDK clients, a real webhook receiver)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client import CollectorRegistry

from sidecar.app import Extras
from sidecar.client import RuntimeClient, connection_update, decrypt_error
from sidecar.rules.safety import BreakerConfig, Mode
from tests.receiver import Receiver, receiving
from tests.seed import SeededPhone, add_phone, keys_of, phone_row
from tests.server import Served, serving, sidecar_config
from tests.waiting import eventually

SECRET = b"safety-secret"
TOKEN = "operator-token"


def owners(tmp_path: Path, url: str) -> Path:
    (tmp_path / "secret").write_bytes(SECRET)
    path = tmp_path / "owners.yaml"
    path.write_text(
        f"defaultTeam: platform\nteams:\n  platform:\n    webhookUrl: {url}\n    secretFile: {tmp_path / 'secret'}\n"
    )
    return path


async def api(served: Served, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, served.base + path, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def holds(registry: CollectorRegistry) -> float:
    return sum(
        sample.value
        for family in registry.collect()
        if family.name == "whatsapp_session_holds"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["reason"] == "bad_mac_limit"
    )


def ids(phone: SeededPhone) -> tuple[int, int, str]:
    return phone.organization_id, phone.organization_phone_id, phone.phone_jid


async def fail_until_closed(served: Served, runtime: RuntimeClient, phone: SeededPhone) -> None:
    """Open the phone, send it three Bad MAC errors, wait until the sidecar has closed it and settled."""
    await runtime.send(connection_update(*ids(phone), "open"))
    for _ in range(3):
        await runtime.send(decrypt_error(*ids(phone), "Bad MAC"))
    await runtime.flush()
    await eventually(lambda: served.components.runtime.is_closed(phone.organization_phone_id), what="closed")
    await served.components.runtime.settle()


async def logged_out(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("""SELECT count(*) FROM "OrganizationPhone" WHERE status = 'logged_out'"""))


async def test_the_breaker_trips_holds_the_rest_and_an_operator_releases_it(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phones = [await add_phone(db, 1 + i % 4, f"7900{i:07d}") for i in range(200)]
    registry = CollectorRegistry()
    async with receiving(SECRET) as receiver:
        config = sidecar_config(
            database,
            api_token=TOKEN,
            owners_file=owners(tmp_path, receiver.url),
            webhook_backoff_initial=0.05,
            breaker=BreakerConfig(max_closes=20, max_share=0.05, window_seconds=300),
            closure_log_path=tmp_path / "closures.jsonl",
        )
        async with serving(config, extras=Extras(registry=registry)) as served, RuntimeClient(served.ws_url) as runtime:
            for phone in phones:
                await runtime.send(connection_update(*ids(phone), "open"))
            for _ in range(3):  # a WhatsApp-side incident: every session fails at once
                for phone in phones:
                    await runtime.send(decrypt_error(*ids(phone), "Bad MAC"))
            await runtime.flush()
            await eventually(lambda: served.components.runtime.held_count == 180, what="180 sessions held")
            await served.components.runtime.settle()
            assert await logged_out(db) == 20, "exactly the threshold (max of 20 and 5% of 200) was logged out"
            status, breaker = await api(served, "GET", "/v1/breaker")
            assert status == 200 and breaker["tripped"] and breaker["heldSessions"] == 180
            assert registry.get_sample_value("whatsapp_sidecar_breaker_tripped") == 1
            assert registry.get_sample_value("whatsapp_sidecar_held_sessions") == 180
            assert holds(registry) == 180
            # Held sessions keep counting and nothing more is logged out.
            for phone in phones[:50]:
                await runtime.send(decrypt_error(*ids(phone), "Bad MAC"))
            await runtime.flush()
            await served.components.runtime.settle()
            assert await logged_out(db) == 20
            held_phone = next(p for p in phones if served.components.runtime.session(p.organization_phone_id))
            assert (
                served.components.runtime.get_session_error_stats(held_phone.organization_phone_id)["badMacErrors"] >= 3
            )
            assert len(await keys_of(db, held_phone)) > 0, "a held session keeps its keys"

            await eventually(lambda: receiver.events.count("session.held") == 180, what="held notifications")
            trips = [item for item in receiver.received if item["event"] == "breaker.tripped"]
            assert len(trips) == 1 and trips[0]["organizationId"] == 0 and trips[0]["team"] == "platform"
            assert (
                await db.fetchval("SELECT count(*) FROM wa_sidecar.decisions WHERE decision = 'breaker.tripped'") == 1
            )

            status, body = await api(served, "POST", "/v1/breaker", {"action": "keep", "operator": "alice"})
            assert status == 200 and body["keptBy"] == "alice" and body["tripped"]
            status, body = await api(served, "POST", "/v1/breaker", {"action": "flip", "operator": "alice"})
            assert status == 400 and body["details"][0]["field"] == "action"
            status, body = await api(
                served, "POST", "/v1/breaker", {"action": "release", "operator": "alice", "closeHeld": True}
            )
            assert status == 200 and not body["tripped"] and len(body["closed"]) == 180
            assert await logged_out(db) == 200
            assert registry.get_sample_value("whatsapp_sidecar_breaker_tripped") == 0

            # Released: automatic logouts work again.
            fresh = await add_phone(db, 9, "79009999999")
            await fail_until_closed(served, runtime, fresh)
            assert (await phone_row(db, fresh))["status"] == "logged_out"
        decisions = Counter(
            line["decision"] for line in map(json.loads, (tmp_path / "closures.jsonl").read_text().splitlines())
            if "decision" in line
        )  # fmt: skip
        assert decisions == {"session.held": 180, "breaker.tripped": 1, "breaker.kept": 1, "breaker.released": 1}


async def run_fleet(
    database: str, phones: list[SeededPhone], receiver: Receiver, tmp_path: Path, **changes: Any
) -> dict[str, Any]:
    """3 Bad MAC for the first phone, 1 for the second, 2 bad decrypts for the third; what was observed."""
    registry = CollectorRegistry()
    config = sidecar_config(
        database, owners_file=owners(tmp_path, receiver.url), webhook_backoff_initial=0.05, **changes
    )
    before = len(receiver.received)
    async with serving(config, extras=Extras(registry=registry)) as served, RuntimeClient(served.ws_url) as runtime:
        for phone in phones:
            await runtime.send(connection_update(*ids(phone), "open"))
        for phone, count, error in (
            (phones[0], 3, "Bad MAC"),
            (phones[1], 1, "Bad MAC"),
            (phones[2], 2, "bad decrypt"),
        ):
            for _ in range(count):
                await runtime.send(
                    decrypt_error(*ids(phone), error, source="app-state" if error == "bad decrypt" else None)
                )
        await runtime.flush()
        await eventually(lambda: served.components.runtime.is_closed(phones[0].organization_phone_id), what="closed")
        await served.components.runtime.settle()
        await eventually(lambda: len(receiver.received) - before == 2, what="unhealthy and closed notifications")
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect()
            if family.name.startswith(("whatsapp_session_closes", "whatsapp_session_heals", "whatsapp_decrypt_errors"))
            for sample in family.samples
            if sample.name.endswith("_total")
        }
    position = {phone.organization_phone_id: index for index, phone in enumerate(phones)}
    events = [(item["event"], position[item["organizationPhoneId"]]) for item in receiver.received[before:]]
    return {"metrics": samples, "webhooks": events}


async def test_observe_mode_leaves_the_database_untouched_and_reports_like_enforce(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    observed = [await add_phone(db, 7, f"7900111000{i}") for i in range(3)]
    enforced = [await add_phone(db, 7, f"7900222000{i}") for i in range(3)]
    keys_before = [await keys_of(db, phone) for phone in observed]
    async with receiving(SECRET) as receiver:
        observe = await run_fleet(database, observed, receiver, tmp_path, mode=Mode.OBSERVE)
        enforce = await run_fleet(database, enforced, receiver, tmp_path)
    assert [await keys_of(db, phone) for phone in observed] == keys_before, "observe: no key deleted"
    assert [(await phone_row(db, phone))["status"] for phone in observed] == ["connected"] * 3
    assert (await phone_row(db, enforced[0]))["status"] == "logged_out" and await keys_of(db, enforced[0]) == set()
    assert observe["metrics"] == enforce["metrics"], "the same decisions, counted the same"
    assert observe["webhooks"] == enforce["webhooks"] == [("session.unhealthy", 0), ("session.closed", 0)]
    record = await db.fetchrow(
        "SELECT socket, keys_deleted, steps FROM wa_sidecar.closures WHERE organization_phone_id = $1",
        observed[0].organization_phone_id,
    )
    assert record is not None, "observe mode records what would have happened"
    steps = json.loads(record["steps"])
    assert record["socket"] == "skipped: observe mode" and record["keys_deleted"] is None
    assert steps["authKeys"] == f"skipped: observe mode, would delete {len(keys_before[0])}"


async def test_the_mode_switches_without_a_restart_and_per_organization(database: str, db: asyncpg.Connection) -> None:
    watched, enforced = await add_phone(db, 8, "79003330001"), await add_phone(db, 7, "79003330002")
    config = sidecar_config(database, api_token=TOKEN, observe_organizations=frozenset({8}))
    async with serving(config) as served, RuntimeClient(served.ws_url) as runtime:
        status, body = await api(served, "POST", "/v1/mode", {"mode": "sideways", "operator": "bob"})
        assert status == 400 and body["details"][0]["field"] == "mode"
        for phone in (watched, enforced):
            await runtime.send(connection_update(*ids(phone), "open"))
            for _ in range(3):
                await runtime.send(decrypt_error(*ids(phone), "Bad MAC"))
        await runtime.flush()
        await eventually(lambda: served.components.runtime.is_closed(watched.organization_phone_id), what="closed")
        await eventually(lambda: served.components.runtime.is_closed(enforced.organization_phone_id), what="closed")
        await served.components.runtime.settle()
        assert (await phone_row(db, watched))["status"] == "connected", "organization 8 is observed"
        assert (await phone_row(db, enforced))["status"] == "logged_out"
        status, body = await api(served, "POST", "/v1/mode", {"mode": "observe", "operator": "bob"})
        assert status == 200 and body == {"mode": "observe", "observeOrganizations": []}
        late = await add_phone(db, 7, "79003330003")
        await fail_until_closed(served, runtime, late)
        assert (await phone_row(db, late))["status"] == "connected", "observe now applies to everyone"
        assert await db.fetchval("SELECT count(*) FROM wa_sidecar.decisions WHERE decision = 'mode.changed'") == 1


async def test_a_reconnect_after_logout_is_detected_and_ended_again(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 7, "79004440001")
    ends: list[dict[str, Any]] = []

    async def on_end(command: dict[str, Any]) -> None:
        ends.append(command)

    registry = CollectorRegistry()
    async with receiving(SECRET) as receiver:
        config = sidecar_config(database, owners_file=owners(tmp_path, receiver.url), webhook_backoff_initial=0.05)
        async with serving(config, extras=Extras(registry=registry)) as served:
            async with RuntimeClient(served.ws_url, on_session_end=on_end) as runtime:
                await runtime.send(connection_update(*ids(phone), "open"))
                for _ in range(3):
                    await runtime.send(decrypt_error(*ids(phone), "Bad MAC"))
                await runtime.flush()
                await eventually(lambda: len(ends) == 1, what="first session.end")
                await served.components.runtime.settle()
                # The backend reconnects with credentials it still holds in memory (the seed's field failure).
                await runtime.send(connection_update(*ids(phone), "open"))
                await runtime.flush()
                await eventually(lambda: len(ends) == 2, what="session.end sent again")
                assert ends[1]["reason"] == "reconnected_after_logout"
                incidents = (
                    "whatsapp_session_incidents_total",
                    {"kind": "reconnected_after_logout", "organization_id": "7"},
                )
                assert registry.get_sample_value(*incidents) == 1
                assert served.components.runtime.is_closed(phone.organization_phone_id), "still logged out"
                await eventually(lambda: "session.reconnected_after_logout" in receiver.events, what="webhook")
                # A real re-login (QR scan) reopens the phone.
                await runtime.send(connection_update(*ids(phone), "open", new_login=True))
                await runtime.flush()
                await eventually(
                    lambda: not served.components.runtime.is_closed(phone.organization_phone_id), what="open"
                )
                assert len(ends) == 2 and registry.get_sample_value(*incidents) == 1
                # A reconnect loop: five closes in a short time, reported once.
                for _ in range(6):
                    await runtime.send(connection_update(*ids(phone), "close", 428))
                    await runtime.send(connection_update(*ids(phone), "open"))
                await runtime.flush()
                loops = ("whatsapp_session_incidents_total", {"kind": "reconnect_loop", "organization_id": "7"})
                await eventually(lambda: registry.get_sample_value(*loops) == 1, what="reconnect loop")
