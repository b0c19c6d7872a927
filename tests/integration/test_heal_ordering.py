"""A heal tells the runtime to drop its cached keys only once their deletion is committed: told earlier, the
runtime would reload the old keys from the database and never be told again."""

from __future__ import annotations

import asyncpg

from sidecar.rules.policy import Heal
from sidecar.rules.records import PhoneRef
from sidecar.runtime.observer import RuntimeObserver
from tests.harness import runtime_over
from tests.seed import add_phone, keys_of, refuse_key_deletes
from tests.waiting import eventually


class HealOutcomes(RuntimeObserver):
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []

    def healed(
        self, phone: PhoneRef, heal: Heal, keys_deleted: int | None, database: str, socket: str, duration: float
    ) -> None:
        self.outcomes.append((database, socket))


async def test_a_pending_deletion_defers_the_cache_drop_until_it_commits(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    seen = HealOutcomes()
    blocker = await asyncpg.connect(database)
    async with runtime_over(database, database_step_timeout=0.2, observers=[seen]) as h:
        socket = h.socket(phone.organization_phone_id)
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE baileys_auth IN ACCESS EXCLUSIVE MODE")  # the deletion has to wait
            await h.runtime.handle_bad_decrypt_error(1, phone.organization_phone_id, phone.phone_jid)
            await eventually(lambda: bool(seen.outcomes), what="heal reported")
            assert seen.outcomes == [("pending", "deferred: sent once the deletion commits")]
            assert socket.cleared == []  # not told while the old keys are still in the database
        await eventually(lambda: bool(socket.cleared), what="told once the deletion committed")
        assert not any(k.startswith("app-state-sync-") for k in await keys_of(db, phone))
    await blocker.close()


async def test_a_failed_deletion_does_not_tell_the_runtime_to_drop_keys(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    await refuse_key_deletes(db)
    seen = HealOutcomes()
    async with runtime_over(database, observers=[seen]) as h:
        socket = h.socket(phone.organization_phone_id)
        await h.runtime.handle_bad_decrypt_error(1, phone.organization_phone_id, phone.phone_jid)
        await eventually(lambda: bool(seen.outcomes), what="heal reported")
        [(database_outcome, socket_outcome)] = seen.outcomes
        assert database_outcome.startswith("failed") and socket_outcome.startswith("skipped")
        await h.runtime.settle()
        assert socket.cleared == []
