"""Leak check: open -> 3 Bad MAC -> close cycles on PostgreSQL, with transient closes mixed in, RSS sampled.

    python -m bench.leak [--phones 1000] [--cycles 20000] [--warmup 2000] [--embedded]
                         [--state-ttl 20s] [--retention 60s]

Cycle i uses phone i mod --phones, so with --phones 100000 --cycles 200000 every cycle meets a phone the
sidecar has not seen for 100,000 cycles (a fresh phone, as in a growing fleet); with the defaults it is the
old fixed pool. Every fourth cycle is only a transient close (`open`, then `close` with 428, no error): it
leaves a session that holds nothing, which --state-ttl must forget. The others close at the third Bad MAC.
The sidecar runs as its own process with a short --state-ttl and --retention (so the run sees both expire);
its RSS and its history tables' row counts are sampled after every round of 1,000 cycles. Printed: RSS after
warm-up, at the end, the growth between them (goal: <= 5%), and the largest and last table sizes (bounded by
what --retention keeps). `--embedded` runs on the in-memory store. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg

from bench.common import NO_BREAKER, Phone, rss_mb, seeded_database, sidecar_process
from sidecar.client import RuntimeClient, connection_update, decrypt_error


@asynccontextmanager
async def pool(phones_count: int, embedded: bool) -> AsyncIterator[tuple[str | None, list[Phone]]]:
    if embedded:
        yield None, [Phone(1 + n % 20, n, f"7900{n:07d}@s.whatsapp.net") for n in range(1, phones_count + 1)]
    else:
        async with seeded_database(phones_count) as seeded:
            yield seeded


ROUND = 1000
TABLES = ("closures", "decisions", "outbox", "session_counters")


async def closing(http: aiohttp.ClientSession) -> bool:
    async with http.get("/v1/sessions", params={"state": "closing"}) as response:
        return bool((await response.json())["sessions"])


async def table_sizes(dsn: str | None) -> dict[str, int]:
    if dsn is None:
        return {}
    db = await asyncpg.connect(dsn)
    try:
        return {table: int(await db.fetchval(f"SELECT count(*) FROM wa_sidecar.{table}")) for table in TABLES}
    finally:
        await db.close()


async def run(args: argparse.Namespace) -> None:
    phones_count, cycles, embedded = args.phones, args.cycles, args.embedded
    round_size = min(ROUND, phones_count)
    rounds = max(1, cycles // round_size)
    warmup_rounds = max(1, args.warmup // round_size)
    flags = (*NO_BREAKER, "--state-ttl", args.state_ttl, "--retention", args.retention)
    async with pool(phones_count, embedded) as (dsn, phones), sidecar_process(dsn, *flags) as sidecar:
        ended = 0
        round_done = asyncio.Event()

        def on_end(command: dict[str, Any]) -> None:
            nonlocal ended
            ended += 1
            if ended >= expected:
                round_done.set()

        samples: list[float] = []
        sizes: list[dict[str, int]] = []
        expected = 0
        started = time.perf_counter()
        async with (
            RuntimeClient(sidecar.ws_url, on_session_end=on_end) as client,
            aiohttp.ClientSession(sidecar.base) as http,
        ):
            for round_number in range(rounds):
                for index in range(round_number * round_size, (round_number + 1) * round_size):
                    phone = phones[index % phones_count]
                    ids = (phone.organization_id, phone.organization_phone_id, phone.jid)
                    await client.send(connection_update(*ids, "open", new_login=True))
                    if index % 4 == 3:  # a transient close: nothing to decide, a session holding nothing
                        await client.send(connection_update(*ids, "close", status_code=428))
                        continue
                    expected += 1
                    for _ in range(3):
                        await client.send(decrypt_error(*ids, "Bad MAC"))
                if ended < expected:  # every close of the round has ended its socket...
                    round_done.clear()
                    await round_done.wait()
                while True:  # ...and finished (the next round logs the phones in again)
                    if not await closing(http):
                        break
                    await asyncio.sleep(0.1)
                samples.append(rss_mb(sidecar.pid))
                if dsn is not None and (round_number % 10 == 9 or round_number == rounds - 1):
                    sizes.append(await table_sizes(dsn))
        elapsed = time.perf_counter() - started
    done = rounds * round_size
    after_warmup = samples[warmup_rounds - 1]
    growth = (samples[-1] - after_warmup) / after_warmup * 100
    store = "embedded store" if embedded else "PostgreSQL"
    print(
        f"leak: {done} cycles ({expected} open -> 3 Bad MAC -> close, {done - expected} transient closes) over "
        f"{phones_count} phones ({store}) with --state-ttl {args.state_ttl} --retention {args.retention} in "
        f"{elapsed:.1f} s ({done / elapsed:,.0f} cycles/s)"
    )
    step = max(1, len(samples) // 25)
    shown = samples[::step] if samples[-1:] == samples[::step][-1:] else [*samples[::step], samples[-1]]
    print(f"  RSS every {step} round(s) of {round_size} (MB): " + " ".join(f"{value:.1f}" for value in shown))
    print(
        f"  after warm-up ({warmup_rounds * round_size} cycles) {after_warmup:.1f} MB, "
        f"at the end {samples[-1]:.1f} MB, "
        f"growth {growth:+.1f}% (goal <= 5%)"
    )
    if sizes:
        for table in TABLES:
            series = [size[table] for size in sizes]
            listed = ", ".join(map(str, series))
            print(f"  {table} rows every 10 rounds: max {max(series):,}, last {series[-1]:,} ({listed})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--embedded", action="store_true", help="the in-memory store instead of PostgreSQL")
    parser.add_argument("--state-ttl", default="20s", help="the sidecar's --state-ttl (short, to see it expire)")
    parser.add_argument("--retention", default="60s", help="the sidecar's --retention (short, to see it prune)")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
