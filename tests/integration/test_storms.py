"""Error storms: coalesced heals, closes that supersede heals, backpressure, and no leaks (small sizes)."""

from __future__ import annotations

import asyncio
import collections
import json
import random
from typing import Any

import aiohttp
import asyncpg

from sidecar.client import RuntimeClient, connection_update, decrypt_error
from sidecar.rules.policy import Heal
from sidecar.rules.records import PhoneRef
from sidecar.rules.safety import BreakerConfig
from sidecar.runtime.observer import RuntimeObserver
from tests.harness import runtime_over
from tests.pgcluster import ThrowawayPostgres
from tests.seed import add_phone
from tests.server import serving, sidecar_config
from tests.waiting import eventually

NO_BREAKER = BreakerConfig(max_closes=1_000_000)

BAD_DECRYPT = "error:1C800064:Provider routines::bad decrypt"


class CoalesceCounter(RuntimeObserver):
    def __init__(self) -> None:
        self.coalesced = 0
        self.heals = 0

    def heal_coalesced(self, phone: PhoneRef, heal: Heal) -> None:
        self.coalesced += 1

    def healed(self, phone: PhoneRef, heal: Heal, *_: object) -> None:
        self.heals += 1


async def test_heals_arriving_during_a_heal_merge_into_one() -> None:
    counter = CoalesceCounter()
    async with runtime_over(None, observers=[counter]) as h:
        socket = h.socket(42)
        gate = socket.clear_gate = asyncio.Event()
        await h.runtime.handle_bad_decrypt_error(1, 42, "79001112233@s.whatsapp.net")
        await socket.clearing.wait()  # the first heal is in flight, waiting on the runtime
        for _ in range(3):
            await h.runtime.handle_bad_decrypt_error(1, 42, "79001112233@s.whatsapp.net")
        gate.set()
        await h.runtime.settle()
    assert counter.coalesced == 3
    assert counter.heals == 2  # the one in flight, then one for the three that waited
    assert socket.cleared == [("app-state-sync-",), ("app-state-sync-",)]


async def test_a_close_supersedes_pending_heals() -> None:
    counter = CoalesceCounter()
    async with runtime_over(None, observers=[counter]) as h:
        socket = h.socket(42)
        gate = socket.clear_gate = asyncio.Event()
        await h.runtime.handle_bad_decrypt_error(1, 42, "79001112233@s.whatsapp.net")
        await socket.clearing.wait()
        for _ in range(4):  # the 5th overall reaches the limit
            await h.runtime.handle_bad_decrypt_error(1, 42, "79001112233@s.whatsapp.net")
        gate.set()
        await h.runtime.settle()
        assert h.runtime.is_closed(42)
    assert len(socket.cleared) == 1  # nothing healed after the close decision
    assert len(socket.ended) == 1


async def test_http_ingest_answers_429_when_the_queue_is_full_and_applies_nothing(
    seeded: str, cluster: ThrowawayPostgres
) -> None:
    cluster.stop()
    # One replica (coordination local) counts while the database is away; fleet mode's own test is in test_fleet.
    config = sidecar_config(
        seeded, pending_steps_limit=6, database_step_timeout=0.2, socket_end_timeout=0.2, coordination="local"
    )
    jid = "79001112233@s.whatsapp.net"
    async with serving(config, wait_restored=False) as served, aiohttp.ClientSession(served.base) as http:
        statuses = []
        for _ in range(6):
            async with http.post("/v1/events", json=decrypt_error(1, 42, jid, BAD_DECRYPT)) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert response.headers["Retry-After"] == "1"
                    assert "busy" in (await response.json())["error"]
        accepted = statuses.count(202)
        assert 429 in statuses and accepted >= 1
        assert served.components.runtime.get_session_error_stats(42)["badDecryptErrors"] == accepted
        assert served.components.metrics.registry.get_sample_value("whatsapp_sidecar_events_throttled_total") == (
            statuses.count(429)
        )
        # The runtime link does not answer 429: it stops reading, and TCP pushes back on the runtime. Its
        # events wait (the queue stays bounded) and none is lost: all are applied once the database is back.
        async with http.ws_connect(served.ws_url) as ws:
            for _ in range(3):
                await ws.send_str(json.dumps(decrypt_error(1, 43, jid, BAD_DECRYPT)))
            assert served.components.pending.depth <= 6
            cluster.start()
            await eventually(lambda: served.components.pending.depth == 0, what="queue drained once PostgreSQL is up")
            await eventually(
                lambda: (
                    served.components.runtime.session(43) is not None
                    and served.components.runtime.get_session_error_stats(43)["badDecryptErrors"] == 3
                ),
                what="the link's three events counted",
            )
            assert served.components.metrics.registry.get_sample_value(
                "whatsapp_sidecar_events_throttled_total"
            ) == statuses.count(429)  # the link never refused one
    db = await asyncpg.connect(seeded)
    stored = await db.fetchval(
        "SELECT bad_decrypt_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = 43"
    )
    await db.close()
    assert stored == 3


async def test_small_storm_closes_every_session_exactly_once(database: str, db: asyncpg.Connection) -> None:
    phones = [await add_phone(db, 1 + i % 5, f"7900{i:07d}") for i in range(100)]
    ends: collections.Counter[int] = collections.Counter()

    def ended(command: dict[str, Any]) -> None:
        ends[command["organizationPhoneId"]] += 1

    stats_statuses: list[int] = []
    # A fleet-wide storm is what the circuit breaker holds; these tests measure the close path, so it stays open.
    async with serving(sidecar_config(database, breaker=NO_BREAKER)) as served:
        clients = [RuntimeClient(served.ws_url, on_session_end=ended) for _ in range(4)]
        for client in clients:
            await client.start()
        for index, phone in enumerate(phones):
            await clients[index % 4].send(
                connection_update(phone.organization_id, phone.organization_phone_id, phone.phone_jid, "open")
            )
        rng = random.Random(7)

        async def storm(client: RuntimeClient, mine: list[Any]) -> None:
            for _ in range(40):
                for phone in mine:
                    text = "Bad MAC" if rng.random() < 0.5 else BAD_DECRYPT
                    await client.send(
                        decrypt_error(phone.organization_id, phone.organization_phone_id, phone.phone_jid, text)
                    )

        async def poll_stats() -> None:
            async with aiohttp.ClientSession(served.base) as http:
                while len(ends) < len(phones):
                    async with http.get(f"/v1/sessions/{phones[0].organization_phone_id}/stats") as response:
                        stats_statuses.append(response.status)
                    await asyncio.sleep(0.01)

        first_id = phones[0].organization_phone_id
        await eventually(lambda: served.components.runtime.session(first_id) is not None)
        poller = asyncio.create_task(poll_stats())
        await asyncio.gather(*(storm(c, phones[i::4]) for i, c in enumerate(clients)))
        await eventually(lambda: len(ends) == len(phones), what="every session ended")
        await poller
        await served.components.runtime.settle()
        await served.components.pending.drained()
        for client in clients:
            await client.stop()
        assert served.components.runtime.session_count == 0
    assert set(ends.values()) == {1}
    assert set(stats_statuses) <= {200}  # closed sessions answer zeros, never an error
    assert await db.fetchval("SELECT count(*) FROM baileys_auth") == 0
    assert await db.fetchval("""SELECT count(*) FROM "OrganizationPhone" WHERE status <> 'logged_out'""") == 0
    per_phone = await db.fetch("SELECT organization_phone_id, count(*) AS n FROM wa_sidecar.closures GROUP BY 1")
    assert len(per_phone) == len(phones) and {row["n"] for row in per_phone} == {1}


async def test_open_error_close_cycles_leave_nothing_behind(database: str, db: asyncpg.Connection) -> None:
    phones = [await add_phone(db, 1, f"7911{i:07d}", keys=("creds",)) for i in range(30)]
    # A fleet-wide storm is what the circuit breaker holds; these tests measure the close path, so it stays open.
    async with serving(sidecar_config(database, breaker=NO_BREAKER)) as served:
        ends: list[int] = []
        async with RuntimeClient(served.ws_url, on_session_end=lambda c: ends.append(c["organizationPhoneId"])) as rc:
            for cycle in range(10):
                for phone in phones:
                    args = (phone.organization_id, phone.organization_phone_id, phone.phone_jid)
                    await rc.send(connection_update(*args, "open", new_login=True))
                    for _ in range(3):
                        await rc.send(decrypt_error(*args, "Bad MAC"))
                expected = (cycle + 1) * len(phones)
                await eventually(lambda: len(ends) == expected, what=f"cycle {cycle} ended")  # noqa: B023
                # A new login comes after the close finished (an `open` during a close does not cancel it).
                await eventually(
                    lambda: all(served.components.runtime.is_closed(p.organization_phone_id) for p in phones)
                )
        components = served.components
        await components.runtime.settle()
        await components.pending.drained()
        assert components.runtime.session_count == 0
        assert components.runtime.background_tasks == 0
        assert components.runtime.closed_count == len(phones)
        assert components.link.commands_in_flight == 0 and components.link.connection_count == 0
        assert components.families.cached_labels == 0
        assert components.pending.depth == 0
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.closures") == 10 * len(phones)
