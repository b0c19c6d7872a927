"""Close latency against real PostgreSQL with realistic row counts.

    python -m bench.close_latency [--phones 10000] [--keys 200] [--closes 1000]

The seed schema holds `--phones` phones with `--keys` Baileys auth rows each (creds, app-state keys and
versions, pre-keys, peer sessions, sender keys: a few hundred per phone in a real store), 2,000,000 rows by
default. The sidecar runs as its own process with a runtime connected over the link that acks session.end at
once. Phones are closed one at a time (open, 3 Bad MAC, wait until the closure is recorded): the closure
record's duration, from the close decision to the record written (socket end + all keys deleted + status +
record, one transaction), is the figure. p50/p99 over the closes. A measurement, not a test (goal: p99 <= 20 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import asyncpg

from bench.common import NO_BREAKER, seeded_database, sidecar_process
from sidecar.client import RuntimeClient, connection_update, decrypt_error

RECORDED = "SELECT EXISTS (SELECT 1 FROM wa_sidecar.closures WHERE organization_phone_id = $1)"


def realistic_keys(count: int) -> tuple[str, ...]:
    fixed = ["creds", "app-state-sync-key-AAAAAFBQ", "app-state-sync-version-regular_high",
             "app-state-sync-version-critical_block"]  # fmt: skip
    peers = (count - len(fixed)) // 2
    prekeys = count - len(fixed) - peers
    return (
        *fixed,
        *(f"pre-key-{n}" for n in range(1, prekeys + 1)),
        *(f"session-1555{n:07d}.0" for n in range(peers)),
    )


async def run(phones_count: int, keys: int, closes: int) -> None:
    started = time.perf_counter()
    async with seeded_database(phones_count, realistic_keys(keys)) as (dsn, phones):
        seeded = time.perf_counter() - started
        db = await asyncpg.connect(dsn)
        rows = await db.fetchval("SELECT count(*) FROM baileys_auth")
        async with sidecar_process(dsn, *NO_BREAKER) as sidecar:
            ended = asyncio.Event()

            def on_end(command: dict[str, Any]) -> None:
                ended.set()

            async with RuntimeClient(sidecar.ws_url, on_session_end=on_end) as client:
                for phone in phones[:closes]:
                    ids = (phone.organization_id, phone.organization_phone_id, phone.jid)
                    ended.clear()
                    await client.send(connection_update(*ids, "open"))
                    for _ in range(3):
                        await client.send(decrypt_error(*ids, "Bad MAC"))
                    await client.flush()
                    await asyncio.wait_for(ended.wait(), 30)
                    # One close at a time: the next phone starts once this closure is recorded, so the figure is a
                    # close's own latency, not queueing behind the previous ones.
                    while not await db.fetchval(RECORDED, phone.organization_phone_id):  # noqa: ASYNC110
                        await asyncio.sleep(0.001)
                deadline = time.monotonic() + 60
                while await db.fetchval("SELECT count(*) FROM wa_sidecar.closures") < closes:
                    if time.monotonic() > deadline:
                        raise RuntimeError("closures were not all recorded")
                    await asyncio.sleep(0.05)
        durations = [1000 * row[0] for row in await db.fetch("SELECT duration_seconds FROM wa_sidecar.closures")]
        left = await db.fetchval("SELECT count(*) FROM baileys_auth")
        await db.close()
    ordered = sorted(durations)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"close latency: {phones_count:,} phones x {keys} keys = {rows:,} auth rows (seeded in {seeded:.0f} s)")
    print(f"  {len(durations)} closes: p50 {statistics.median(durations):.2f} ms, p99 {p99:.2f} ms, "
          f"max {ordered[-1]:.2f} ms (goal p99 <= 20 ms); auth rows left {left:,} "
          f"(expected {rows - closes * keys:,})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--closes", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(run(args.phones, args.keys, args.closes))


if __name__ == "__main__":
    main()
