"""PostgreSQL goes away in the middle of a close: the runtime keeps deciding, steps wait, nothing is lost,
nothing is applied twice, even when the sidecar restarts during the outage."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import asyncpg

from sidecar.config import SchemaMapping
from sidecar.store.journal import JOURNAL_FILE, Journal
from sidecar.store.pending import PendingSteps
from sidecar.store.postgres import PostgresStore
from tests.harness import runtime_over
from tests.pgcluster import ThrowawayPostgres
from tests.replicas import Replica
from tests.seed import KEY_NAMES, add_phone, keys_of, phone_row
from tests.waiting import eventually


async def test_outage_in_the_middle_of_a_close_and_a_restart_during_it(
    cluster: ThrowawayPostgres, seeded: str, tmp_path: Path
) -> None:
    db = await asyncpg.connect(seeded)
    closing = await add_phone(db, 1, "79001112233")
    healing = await add_phone(db, 1, "79004445566")
    await db.close()
    state_dir = tmp_path / "state"

    async with runtime_over(seeded, state_dir=state_dir, database_step_timeout=0.5) as h:
        socket = h.socket(closing.organization_phone_id)
        socket.gate = asyncio.Event()
        for _ in range(2):
            await h.runtime.handle_bad_mac_error(1, closing.organization_phone_id, closing.phone_jid)
        await h.runtime.settle()
        await h.pending.drained()
        assert await h.runtime.handle_bad_mac_error(1, closing.organization_phone_id, closing.phone_jid) is False
        await socket.ending.wait()  # the close has ended... the socket, and is about to touch the database
        cluster.stop()
        socket.gate.set()
        await h.runtime.settle()
        # The close finished in memory; its database half waits.
        assert h.runtime.session(closing.organization_phone_id) is None
        assert h.runtime.is_closed(closing.organization_phone_id)
        await eventually(lambda: h.pending.unavailable_reason is not None, what="outage noticed")
        # Meanwhile the runtime keeps counting and deciding.
        for _ in range(2):
            await h.runtime.handle_bad_decrypt_error(1, healing.organization_phone_id, healing.phone_jid)
        assert h.runtime.get_session_error_stats(healing.organization_phone_id)["badDecryptErrors"] == 2
        # The logout, two heals and two increments wait (heals are submitted from their own tasks).
        await eventually(lambda: h.pending.depth >= 5, what="steps queued during the outage")
        await h.runtime.shutdown(grace_seconds=1)
    # The sidecar stopped during the outage; the journal kept the steps. A new one starts, still in the outage.
    async with runtime_over(seeded, state_dir=state_dir, database_step_timeout=0.5, restore=False) as h2:
        assert h2.pending.depth >= 5
        cluster.start()
        await eventually(lambda: h2.pending.depth == 0, what="pending steps applied after the outage")
        assert h2.pending.unavailable_reason is None
        assert h2.pending.failed_steps == 0

    db = await asyncpg.connect(seeded)
    try:
        assert await keys_of(db, closing) == set()
        assert (await phone_row(db, closing))["status"] == "logged_out"
        [closure] = await db.fetch("SELECT * FROM wa_sidecar.closures")
        assert closure["organization_phone_id"] == closing.organization_phone_id
        assert closure["keys_deleted"] > 0
        assert await keys_of(db, healing) == {k for k in KEY_NAMES if not k.startswith("app-state-sync-")}
        counters = await db.fetchrow(
            "SELECT * FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", healing.organization_phone_id
        )
        assert counters is not None and counters["bad_decrypt_errors"] == 2
    finally:
        await db.close()
    # Nothing is left in the journal.
    assert Journal(state_dir).load() == []


async def test_a_replay_after_a_crash_applies_nothing_twice(
    cluster: ThrowawayPostgres, seeded: str, tmp_path: Path
) -> None:
    """Steps applied, then the process dies before its journal notes it: the replay must skip them."""
    db = await asyncpg.connect(seeded)
    phone = await add_phone(db, 1, "79001112233")
    await db.close()
    state_dir = tmp_path / "state"
    cluster.stop()
    async with runtime_over(seeded, state_dir=state_dir, restore=False) as h:
        for _ in range(3):
            await h.runtime.handle_bad_decrypt_error(1, phone.organization_phone_id, phone.phone_jid)
        await eventually(lambda: h.pending.unavailable_reason is not None)
        snapshot = (state_dir / JOURNAL_FILE).read_text()  # as the journal looked before anything was applied
        cluster.start()
        await eventually(lambda: h.pending.depth == 0)
    (state_dir / JOURNAL_FILE).write_text(snapshot)  # the crash: the journal never learned they were applied

    store = await PostgresStore.connect(seeded, SchemaMapping())
    pending = PendingSteps(store, 1000, Journal(state_dir))
    replayed = await pending.start()
    await pending.drained()
    await pending.stop()
    await store.close()
    journaled = [line for line in snapshot.splitlines() if line.split("\t")[0].isdigit()]
    assert replayed == len(journaled) >= 4  # three increments and at least one (coalesced) heal

    db = await asyncpg.connect(seeded)
    try:
        count = await db.fetchval(
            "SELECT bad_decrypt_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1",
            phone.organization_phone_id,
        )
    finally:
        await db.close()
    assert count == 3
    shutil.rmtree(state_dir)


async def test_a_database_that_is_away_is_said_once_then_once_more_when_it_answers(
    cluster: ThrowawayPostgres, seeded: str, tmp_path: Path
) -> None:
    """A real `serve` started while its PostgreSQL is down retries every second: each retry loop warns once (not
    once a try) and says, when the database answers, how many tries it took."""
    cluster.stop()
    replica = Replica("alone", seeded, tmp_path)
    await replica.start(ready=False)
    try:
        await eventually(lambda: "cannot read the fleet settings yet" in replica.log(), what="first warning")
        await asyncio.sleep(3)  # a few retries (the count below says how many there were)
        cluster.start()
        await eventually(lambda: "can read the fleet settings again" in replica.log(), what="recovery line")
        await eventually(lambda: "can load stored counters again" in replica.log(), what="recovery line")
    finally:
        await replica.stop()
    lines = [json.loads(line) for line in replica.log().splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    for what in ("read the fleet settings", "load stored counters"):
        warned = [m for m in messages if m.startswith(f"cannot {what} yet")]
        assert len(warned) == 1, messages
        (recovered,) = [m for m in messages if m.startswith(f"can {what} again")]
        tries = int(re.search(r"and (\d+) failed tries", recovered).group(1))  # type: ignore[union-attr]
        assert tries >= 3, recovered  # it retried; it did not say so each time
        assert not [m for m in messages if m.startswith(f"still cannot {what}")]  # under a minute: no summary
