"""The loss ledger (store/loss_ledger.py) on real PostgreSQL, two ledgers standing for two replicas: a failure whose
replica went away is taken over once; two replicas settling the same failure count it once; a recovery seen
before the failure was shared still counts; an outage raises StoreUnavailable and settles nothing (read with SQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sidecar.config import SchemaMapping
from sidecar.ports import SharedFailure, StoreUnavailable
from sidecar.rules.records import PhoneRef
from sidecar.store.loss_ledger import PostgresLossLedger
from sidecar.store.postgres import PostgresStore
from tests.pgcluster import ThrowawayPostgres
from tests.waiting import eventually

PHONE = PhoneRef(3, 31)


@pytest.fixture
async def store(database: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.connect(database, SchemaMapping())
    yield opened
    await opened.close()


async def test_a_replica_gone_before_its_deadline_leaves_its_failures_to_another(
    store: PostgresStore, db: asyncpg.Connection
) -> None:
    gone = PostgresLossLedger(store, orphan_grace=0.0)
    survivor = PostgresLossLedger(store, orphan_grace=0.0, scan_seconds=0.0)
    failure = SharedFailure(PHONE, "ORPHAN1", deferred=True, peer_user="79005550003")
    first = await gone.exchange([failure], [], [], 0.3)  # shared, then the replica is never heard of again
    assert first.orphans == () and first.lost == frozenset()
    taken: list[SharedFailure] = []

    async def taken_over() -> bool:
        taken.extend((await survivor.exchange([], [], [], 0.3)).orphans)
        return bool(taken)

    await eventually(taken_over, what="the orphan taken past its deadline")
    assert taken == [failure], "lost once, with the loss-aware Bad MAC and its peer"
    assert (await survivor.exchange([], [], [], 0.3)).orphans == ()
    assert await db.fetchval("SELECT settled FROM wa_sidecar.message_failures WHERE message_id = 'ORPHAN1'") is True


async def test_two_replicas_settling_one_failure_count_it_once(store: PostgresStore, db: asyncpg.Connection) -> None:
    a, b = PostgresLossLedger(store), PostgresLossLedger(store)
    keys = [(PHONE.organization_phone_id, f"BOTH{n}") for n in range(50)]
    failures = [SharedFailure(PHONE, message_id) for _, message_id in keys]
    await asyncio.gather(a.exchange(failures, [], [], 300), b.exchange(failures, [], [], 300))
    settled = await asyncio.gather(a.exchange([], [], keys, 300), b.exchange([], [], keys, 300))
    assert len(settled[0].lost) + len(settled[1].lost) == 50
    assert settled[0].lost | settled[1].lost == frozenset(keys)
    # a retry failing again on another replica after it was settled is still the same message: not lost twice
    again = await b.exchange(failures[:1], [], keys[:1], 300)
    assert again.lost == frozenset()
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.message_failures WHERE settled") == 50


async def test_a_recovery_seen_before_the_failure_was_shared_still_counts(store: PostgresStore) -> None:
    failing, recovering = PostgresLossLedger(store), PostgresLossLedger(store)
    await recovering.exchange([], [(PHONE, "EARLY"), (PHONE, "EARLY")], [], 300)  # twice in one batch: one row
    key = (PHONE.organization_phone_id, "EARLY")
    settled = await failing.exchange([SharedFailure(PHONE, "EARLY")], [], [key], 300)
    assert settled.lost == frozenset()
    lost = await failing.exchange([SharedFailure(PHONE, "LATE")], [], [(PHONE.organization_phone_id, "LATE")], 300)
    assert lost.lost == frozenset({(PHONE.organization_phone_id, "LATE")})


async def test_an_outage_settles_nothing_and_the_next_exchange_does(cluster: ThrowawayPostgres, seeded: str) -> None:
    store = await PostgresStore.connect(seeded, SchemaMapping(), command_timeout=2.0)
    try:
        ledger = PostgresLossLedger(store)
        await ledger.exchange([SharedFailure(PHONE, "AWAY")], [], [], 300)
        cluster.stop()
        key = (PHONE.organization_phone_id, "AWAY")
        with pytest.raises(StoreUnavailable):
            await ledger.exchange([], [], [key], 300)
        cluster.start()
        assert (await ledger.exchange([], [], [key], 300)).lost == frozenset({key})
    finally:
        await store.close()
