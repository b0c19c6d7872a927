"""The loss ledger in PostgreSQL (migration 11, `message_failures`): the failed messages every replica sees, so a
failure taken by one replica and its recovery taken by another (the runtime's link moved in between) is not lost,
and a message is counted lost exactly once in the fleet.

- A replica shares the failures it tracks (runtime/message_loss.py) on its next tick; the row's deadline is the
  database's clock plus --loss-deadline (a replica whose clock is off changes nothing).
- A recovery marks the row recovered, or leaves a recovered row for a failure not shared yet.
- At its own deadline the replica that tracked a failure settles it: `UPDATE … SET settled … WHERE NOT settled
  RETURNING` takes the row once, so of two replicas that both tracked it (the failure reported again after a
  reconnect) one counts it; a row marked recovered is not lost; a row settled already was counted elsewhere.
- Orphans: a failure not settled `ORPHAN_GRACE_SECONDS` past its deadline lost the replica that tracked it
  (SIGKILL, a rolling upgrade, a pause): whichever replica takes it counts it lost.
- An idle replica (nothing to share or settle) opens no transaction: it looks for orphans every `SCAN_SECONDS`.
- Settled rows stay `SETTLED_KEEP_SECONDS` past their deadline, so a retry of the same message failing again
  on another replica later is still the same message (not lost twice); then they are pruned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final

from sidecar.ports import LedgerSettled, SharedFailure
from sidecar.rules.records import PhoneRef
from sidecar.store.postgres import PostgresStore

ORPHAN_GRACE_SECONDS: Final = 60.0  # past a row's deadline: longer than any replica's tick and its clock's drift
SETTLED_KEEP_SECONDS: Final = 3600.0
ROWS_PER_TICK: Final = 1000
SCAN_SECONDS: Final = 10.0  # how often an exchange with nothing to share or settle still looks for orphans


class PostgresLossLedger:
    def __init__(
        self,
        store: PostgresStore,
        orphan_grace: float = ORPHAN_GRACE_SECONDS,
        scan_seconds: float = SCAN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._orphan_grace = orphan_grace
        self._scan_seconds = scan_seconds
        self._clock = clock
        self._next_scan = 0.0

    async def exchange(
        self,
        failed: Sequence[SharedFailure],
        recovered: Sequence[tuple[PhoneRef, str]],
        due: Sequence[tuple[int, str]],
        deadline: float,
        take_orphans: bool = True,
    ) -> LedgerSettled:
        now = self._clock()
        if not (failed or recovered or due) and (now < self._next_scan or not take_orphans):
            return LedgerSettled(frozenset())  # idle: no transaction every tick, only a scan for orphans now and then
        self._next_scan = now + self._scan_seconds
        sql = self._store.sql
        async with self._store.transaction() as conn:
            if failed:
                await conn.execute(
                    sql.failures_share,
                    [item.phone.organization_phone_id for item in failed],
                    [item.message_id for item in failed],
                    [item.phone.organization_id for item in failed],
                    [item.peer_user for item in failed],
                    [item.deferred for item in failed],
                    deadline,
                )
            marked = {(phone.organization_phone_id, message_id): phone for phone, message_id in recovered}
            if marked:  # one row per key: ON CONFLICT DO UPDATE may not touch a row twice in one statement
                await conn.execute(
                    sql.failures_recovered,
                    [phone_id for phone_id, _ in marked],
                    [message_id for _, message_id in marked],
                    [phone.organization_id for phone in marked.values()],
                    deadline,
                )
            lost: set[tuple[int, str]] = set()
            if due:
                rows = await conn.fetch(
                    sql.failures_settle, [phone_id for phone_id, _ in due], [message_id for _, message_id in due]
                )
                lost = {(row["organization_phone_id"], row["message_id"]) for row in rows if not row["recovered"]}
            rows = await conn.fetch(sql.failures_orphaned, self._orphan_grace, ROWS_PER_TICK) if take_orphans else []
            await conn.execute(sql.failures_prune, SETTLED_KEEP_SECONDS, ROWS_PER_TICK)
        orphans = tuple(
            SharedFailure(
                PhoneRef(row["organization_id"], row["organization_phone_id"]), row["message_id"], row["deferred"],
                row["peer_user"],
            )
            for row in rows
            if not row["recovered"]
        )  # fmt: skip
        return LedgerSettled(frozenset(lost), orphans)
