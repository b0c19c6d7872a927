"""Message loss through the real server: failures with a `messageId`, recoveries for some (`message.recovered`),
the rest lost once `--loss-deadline` passes. Counters and the per-session family read with the stock Prometheus
parser, the owner webhook checked by the stock `standardwebhooks` verifier (tests/receiver.py), the session view
over HTTP. The bound under a flood of ids; bad input answered 400 naming the field."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg

from sidecar.client import connection_update, decrypt_error, message_recovered
from sidecar.rules.policy import HealthPolicy
from tests.integration.test_notifications import SECRET, owners_file
from tests.integration.test_restrictions import post, request, samples
from tests.pgcluster import ThrowawayPostgres
from tests.receiver import receiving
from tests.replicas import Replica, replicas
from tests.seed import add_phone
from tests.server import serving, sidecar_config
from tests.waiting import eventually

DEADLINE = 1.5


def one(found: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    """The value of the sample with exactly these labels (0 when the series is not there)."""
    return found.get(tuple(sorted(labels.items())), 0.0)


async def test_failures_recoveries_and_the_lost_count_after_the_deadline(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 4, "79001113344")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with receiving(SECRET) as receiver:
        config = sidecar_config(
            database, owners_file=owners_file(tmp_path, receiver.url), webhook_backoff_initial=0.05,
            loss_deadline=DEADLINE,
        )  # fmt: skip
        async with serving(config) as served:
            await post(served, connection_update(4, pid, jid, "open"))
            await post(
                served,
                decrypt_error(4, pid, jid, "Bad MAC", source="message", message_id="3EB0AAA1"),
                decrypt_error(4, pid, jid, "No session record", source="message", message_id="3EB0AAA2"),
                decrypt_error(4, pid, jid, "Bad MAC", source="message", message_id="3EB0AAA3"),
                decrypt_error(4, pid, jid, "Bad MAC", source="message", message_id="3EB0AAA3"),  # a retry failing too
                decrypt_error(4, pid, jid, "Bad MAC", source="message"),  # no id: not a tracked message
            )
            await post(
                served,
                message_recovered(4, pid, jid, "3EB0AAA1", "retry"),
                message_recovered(4, pid, jid, "3EB0AAA2", "placeholder"),
                message_recovered(4, pid, jid, "NEVERFAILED", "other"),  # an id nothing failed: counted, no 500
            )
            undecryptable = await samples(served, "whatsapp_messages_undecryptable_total")
            assert one(undecryptable, organization_id="4") == 3.0
            recovered = await samples(served, "whatsapp_messages_recovered_total")
            assert one(recovered, organization_id="4", via="retry") == 1.0
            assert one(recovered, organization_id="4", via="placeholder") == 1.0
            assert one(recovered, organization_id="4", via="other") == 1.0
            assert one(await samples(served, "whatsapp_messages_lost_total"), organization_id="4") == 0.0

            async def lost() -> bool:
                return one(await samples(served, "whatsapp_messages_lost_total"), organization_id="4") == 1.0

            await eventually(lost, what="the unrecovered message lost after the deadline")
            per_session = await samples(served, "whatsapp_session_messages_lost")
            assert [v for labels, v in per_session.items() if ("organization_phone_id", str(pid)) in labels] == [1.0]
            status, body = await request(served, "GET", f"/v1/sessions/{pid}")
            assert status == 200 and body["messagesLost"] == 1, body
            await eventually(lambda: "session.losing_messages" in receiver.events, what="the owner told")
            # getSessionErrorStats keeps the seed's shape exactly
            status, stats = await request(served, "GET", f"/v1/sessions/{pid}/stats")
            assert set(stats) == {"badMacErrors", "badDecryptErrors", "maxBadMacErrors", "maxBadDecryptErrors",
                                  "isHealthy"}  # fmt: skip
    assert receiver.events.count("session.losing_messages") == 1


async def test_a_flood_of_ids_is_bounded_and_the_rest_counted_untracked(tmp_path: Path) -> None:
    config = sidecar_config(None, loss_deadline=DEADLINE)
    jid = "79001113355@s.whatsapp.net"
    async with serving(config) as served:
        for start in (0, 750):
            await post(
                served,
                *(decrypt_error(5, 77, jid, "Bad MAC", message_id=f"FLOOD{n}") for n in range(start, start + 750)),
            )
        assert one(await samples(served, "whatsapp_messages_undecryptable_total"), organization_id="5") == 1500.0
        assert one(await samples(served, "whatsapp_messages_untracked_total"), organization_id="5") == 500.0

        async def lost() -> bool:
            return one(await samples(served, "whatsapp_messages_lost_total"), organization_id="5") == 1000.0

        await eventually(lost, what="the 1,000 tracked ids lost at the deadline, the untracked 500 not")


async def test_bad_ids_and_recoveries_are_a_400_naming_the_field(tmp_path: Path) -> None:
    jid = "79001113366@s.whatsapp.net"
    bad: list[tuple[dict[str, Any], str]] = [
        (decrypt_error(6, 78, jid, "Bad MAC", message_id="3EB0\x00NUL"), "messageId"),
        (decrypt_error(6, 78, jid, "Bad MAC", message_id="X" * 10_000), "messageId"),
        (message_recovered(6, 78, jid, "3EB0", "carrier-pigeon"), "via"),
        (message_recovered(6, 78, jid, "has space", "retry"), "messageId"),
    ]
    async with serving(sidecar_config(None)) as served:
        for event, field in bad:
            status, body = await request(served, "POST", "/v1/events", [event])
            assert status == 400, body
            assert field in str(body["details"]), body
        assert one(await samples(served, "whatsapp_messages_undecryptable_total"), organization_id="6") == 0.0


async def test_loss_aware_counts_only_lost_bad_macs_and_closes_once_at_the_limit(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    recovering = await add_phone(db, 8, "79001114411")
    broken = await add_phone(db, 8, "79001114422")
    config = sidecar_config(database, loss_deadline=DEADLINE)
    config = replace(config, policy=replace(config.policy, health=HealthPolicy.LOSS_AWARE))
    a, b = recovering.organization_phone_id, broken.organization_phone_id
    ja, jb = recovering.phone_jid, broken.phone_jid
    peer = "79005550001@s.whatsapp.net"
    async with serving(config) as served:
        await post(served, connection_update(8, a, ja, "open"), connection_update(8, b, jb, "open"))
        await post(
            served,
            *(decrypt_error(8, a, ja, "Bad MAC", peer_jid=peer, message_id=f"A{n}") for n in range(3)),
            *(decrypt_error(8, b, jb, "Bad MAC", peer_jid=peer, message_id=f"B{n}") for n in range(3)),
        )

        async def healed() -> bool:  # each session's peer healed while nothing is counted
            return sum((await samples(served, "whatsapp_session_heals_total")).values()) >= 2.0

        await eventually(healed, what="the failures healed at once")
        for pid in (a, b):
            _, stats = await request(served, "GET", f"/v1/sessions/{pid}/stats")
            assert stats["badMacErrors"] == 0, "not counted while the message may still be recovered"
        await post(served, message_recovered(8, a, ja, "A0"), message_recovered(8, a, ja, "A1"))

        async def broken_closed() -> bool:
            status: str = await db.fetchval('SELECT status FROM "OrganizationPhone" WHERE id = $1', b)
            return status == "logged_out"

        await eventually(broken_closed, what="three lost Bad MACs close the broken session")
        await eventually(lambda: _stats_of(served, a, 1), what="the recovering session counts only its lost message")
    closures = await db.fetch(
        "SELECT organization_phone_id, reason, bad_mac_errors FROM wa_sidecar.closures ORDER BY organization_phone_id"
    )
    assert [(r["organization_phone_id"], r["reason"], r["bad_mac_errors"]) for r in closures] == [
        (b, "bad_mac_limit", 3)
    ]
    assert await db.fetchval('SELECT status FROM "OrganizationPhone" WHERE id = $1', a) == "connected"


async def _stats_of(served: Any, pid: int, bad_macs: int) -> bool:
    status, stats = await request(served, "GET", f"/v1/sessions/{pid}/stats")
    return status == 200 and stats["badMacErrors"] == bad_macs


async def test_fleet_mode_a_failure_on_one_replica_its_recovery_on_another(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The runtime's link moved from replica a to b between a failure and its recovery (and one failure was reported
    again on b): the loss ledger in PostgreSQL counts the recovered message not lost, the lost one lost once in the
    fleet, and under loss-aware its Bad MAC once in the shared counters (read with SQL)."""
    phone = await add_phone(db, 9, "79001115511")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    peer = "79005550002@s.whatsapp.net"
    extra = ["--loss-deadline", "2", "--health-policy", "loss-aware"]
    async with replicas(2, database, tmp_path, extra) as (a, b):
        await a.events([connection_update(9, pid, jid, "open")])
        await a.events(
            [
                decrypt_error(9, pid, jid, "Bad MAC", peer_jid=peer, message_id=f"F{n}")
                for n in ("MOVED", "LOST", "HERE")
            ]
        )
        await a.events([message_recovered(9, pid, jid, "FHERE", "retry")])  # on the replica that took the failure

        async def shared() -> bool:
            return int(await db.fetchval("SELECT count(*) FROM wa_sidecar.message_failures")) >= 2

        await eventually(shared, what="replica a shares its failures")
        # the link moves to b: the lost one's retry fails there too, the other one is recovered there
        await b.events([decrypt_error(9, pid, jid, "Bad MAC", peer_jid=peer, message_id="FLOST")])
        await b.events([message_recovered(9, pid, jid, "FMOVED", "retry")])

        async def settled() -> bool:
            unsettled = "SELECT count(*) FROM wa_sidecar.message_failures WHERE NOT settled"
            return int(await db.fetchval(unsettled)) == 0

        await eventually(settled, what="every failure settled by its deadline")

        async def lost_in_fleet() -> float:
            found = [await samples(replica.base, "whatsapp_messages_lost_total") for replica in (a, b)]
            return sum(one(each, organization_id="9") for each in found)

        await eventually(lambda: _at_least(lost_in_fleet, 1.0), what="the lost message counted")

        async def counted() -> int:
            value = await db.fetchval(
                "SELECT bad_mac_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", pid
            )
            return int(value or 0)

        await eventually(lambda: _at_least(counted, 1), what="its Bad MAC counted")
        await eventually(lambda: _settled_on_both(pid, a, b), what="both replicas done with their due failures")
        assert await lost_in_fleet() == 1.0, "FLOST lost once in the fleet, FMOVED and FHERE recovered"
        assert await counted() == 1, "the lost message's Bad MAC counted once, the recovered ones not at all"
        recovered = [one(await samples(r.base, "whatsapp_messages_recovered_total"), organization_id="9", via="retry")
                     for r in (a, b)]  # fmt: skip
        assert recovered == [1.0, 1.0]


async def _at_least(value: Any, floor: float) -> bool:
    return bool(await value() >= floor)


async def _settled_on_both(pid: int, *fleet: Any) -> bool:
    """No replica waits on a failure of the session any more (GET /v1/sessions/{id} `messagesPending`)."""
    for replica in fleet:
        status, body = await replica.request("GET", f"/v1/sessions/{pid}")
        if status != 200 or body["messagesPending"] != 0:
            return False
    return True


async def test_while_postgresql_is_away_nothing_is_lost_and_the_session_still_answers(
    cluster: ThrowawayPostgres, seeded: str
) -> None:
    """A failure whose deadline passes with the database away is not counted lost (the replicas cannot agree): it
    waits (`messagesPending`), GET /v1/sessions/{id} answers from memory (restrictions `stale`), and once PostgreSQL
    is back the failure is lost once (stock parser; the ledger read with SQL)."""
    db = await asyncpg.connect(seeded)
    phone = await add_phone(db, 6, "79001116622")
    await db.close()
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with serving(sidecar_config(seeded, loss_deadline=DEADLINE, database_step_timeout=1.0)) as served:
        await post(served, connection_update(6, pid, jid, "open"))
        await post(served, decrypt_error(6, pid, jid, "Bad MAC", source="message", message_id="AWAY1"))
        cluster.stop()

        async def waiting() -> bool:  # past its deadline, still waited on: not lost while the fleet cannot agree
            status, body = await request(served, "GET", f"/v1/sessions/{pid}")
            return status == 200 and body["restrictions"].get("stale") is True and body["messagesPending"] == 1

        await eventually(waiting, what="the session answered from memory with the failure waiting")

        async def past_deadline() -> bool:  # due, and waiting for the ledger
            return sum((await samples(served, "whatsapp_messages_unsettled")).values()) == 1.0

        await eventually(past_deadline, what="the failure past its deadline, unsettled")
        assert one(await samples(served, "whatsapp_messages_lost_total"), organization_id="6") == 0.0
        cluster.start()

        async def lost() -> bool:
            return one(await samples(served, "whatsapp_messages_lost_total"), organization_id="6") == 1.0

        await eventually(lost, deadline_seconds=60, what="lost once the database is back")
        status, body = await request(served, "GET", f"/v1/sessions/{pid}")
        assert status == 200 and body["messagesPending"] == 0 and "stale" not in body["restrictions"]
    db = await asyncpg.connect(seeded)
    try:
        settled = await db.fetchval("SELECT settled FROM wa_sidecar.message_failures WHERE message_id = 'AWAY1'")
        assert settled is True
    finally:
        await db.close()


async def test_a_replica_stopped_with_sigterm_hands_its_pending_failures_to_the_ledger(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A rolling upgrade: failures taken a moment before SIGTERM (before the once-a-second share) are in the loss
    ledger after the replica stopped (read with SQL), so the replicas that stay settle them."""
    phone = await add_phone(db, 9, "79001115522")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    replica = Replica("stopping", database, tmp_path, ["--loss-deadline", "300"])
    await replica.start()
    await replica.events([connection_update(9, pid, jid, "open")])
    await replica.events(
        [decrypt_error(9, pid, jid, "No session record", source="message", message_id=f"TERM{n}") for n in range(50)]
    )
    await replica.stop()  # SIGTERM at once
    shared = await db.fetchval("SELECT count(*) FROM wa_sidecar.message_failures WHERE message_id LIKE 'TERM%'")
    assert shared == 50
