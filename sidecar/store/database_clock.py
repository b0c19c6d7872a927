"""Fleet mode: the time every replica compares is PostgreSQL's, not its own.

Breaker buckets are counted with `now()` inside the deciding transaction (store/shared_decisions.py). Every other
time a replica writes for the others to read (an event's time in the windowed policy and the reconnect-loop
history, a logout's `closed_at` for the logout-stick rule, closure times, retention cutoffs) comes from this clock:
the replica's clock corrected by its measured offset from the database's, re-measured every OFFSET_SECONDS. A
replica whose clock is off by more than WARN_SECONDS says so (a warning and whatsapp_sidecar_clock_offset_seconds),
and decides correctly all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sidecar.ports import StoreUnavailable
from sidecar.store.postgres import PostgresStore

log = logging.getLogger("sidecar.clock")

OFFSET_SECONDS = 10.0
WARN_SECONDS = 1.0


class DatabaseClock:
    def __init__(self, store: PostgresStore, local: Callable[[], datetime]) -> None:
        self._store = store
        self._local = local
        self.offset = 0.0  # seconds: the database's clock minus this replica's
        self.measured = False

    @property
    def ahead(self) -> float:
        """Seconds this replica's clock is ahead of PostgreSQL's (negative: behind)."""
        return -self.offset

    def __call__(self) -> datetime:
        return self._local() + timedelta(seconds=self.offset)

    async def measure(self) -> float:
        """One round trip: the database's clock against the midpoint of the local clock around it."""
        async with self._store.connection() as conn:
            sent = self._local().timestamp()
            started = time.monotonic()
            database = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))
            elapsed = time.monotonic() - started
        offset = database - (sent + elapsed / 2)
        skewed = abs(offset) > WARN_SECONDS
        if skewed and (not self.measured or abs(self.offset) <= WARN_SECONDS):
            log.warning(
                "this replica's clock is %+.1f s off PostgreSQL's: shared decisions use PostgreSQL's time, but "
                "run NTP (chrony, systemd-timesyncd) on every node",
                -offset,
            )
        elif not skewed and self.measured and abs(self.offset) > WARN_SECONDS:
            log.info("this replica's clock agrees with PostgreSQL's again (%+.3f s)", -offset)
        self.offset, self.measured = offset, True
        return offset

    async def follow(self) -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):  # the outage is reported elsewhere; the last offset stands
                await self.measure()
            await asyncio.sleep(OFFSET_SECONDS)
