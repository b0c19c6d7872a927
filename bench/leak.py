"""Leak check: open -> 3 Bad MAC -> close cycles over a fixed pool of phones on PostgreSQL, RSS sampled.

    python -m bench.leak [--phones 1000] [--cycles 20000] [--warmup 2000] [--embedded]

`--embedded` runs the sidecar on its in-memory store (no PostgreSQL): fast enough for 1,000,000 cycles.

Each round opens every phone of the pool, sends it three Bad MAC errors, and waits until the sidecar has
closed and forgotten all of them (its API lists no session) before the next round logs them in again. The
sidecar runs as its own process; its RSS is sampled after every round. Printed: RSS after warm-up, at the
end, and the growth between them (goal: <= 5%). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from bench.common import NO_BREAKER, Phone, rss_mb, seeded_database, sidecar_process
from sidecar.client import RuntimeClient, connection_update, decrypt_error


@asynccontextmanager
async def pool(phones_count: int, embedded: bool) -> AsyncIterator[tuple[str | None, list[Phone]]]:
    if embedded:
        yield None, [Phone(1 + n % 20, n, f"7900{n:07d}@s.whatsapp.net") for n in range(1, phones_count + 1)]
    else:
        async with seeded_database(phones_count) as seeded:
            yield seeded


async def run(phones_count: int, cycles: int, warmup: int, embedded: bool) -> None:
    rounds = max(1, cycles // phones_count)
    warmup_rounds = max(1, warmup // phones_count)
    async with pool(phones_count, embedded) as (dsn, phones), sidecar_process(dsn, *NO_BREAKER) as sidecar:
        ended = 0

        def on_end(command: dict[str, Any]) -> None:
            nonlocal ended
            ended += 1

        samples: list[float] = []
        started = time.perf_counter()
        async with (
            RuntimeClient(sidecar.ws_url, on_session_end=on_end) as client,
            aiohttp.ClientSession(sidecar.base) as http,
        ):
            for round_number in range(rounds):
                for phone in phones:
                    ids = (phone.organization_id, phone.organization_phone_id, phone.jid)
                    await client.send(connection_update(*ids, "open", new_login=True))
                    for _ in range(3):
                        await client.send(decrypt_error(*ids, "Bad MAC"))
                while True:  # every session of the round closed and forgotten
                    async with http.get("/v1/sessions") as response:
                        if not (await response.json())["sessions"] and ended == (round_number + 1) * phones_count:
                            break
                    await asyncio.sleep(0.05)
                samples.append(rss_mb(sidecar.pid))
        elapsed = time.perf_counter() - started
    done = rounds * phones_count
    after_warmup = samples[warmup_rounds - 1]
    growth = (samples[-1] - after_warmup) / after_warmup * 100
    store = "embedded store" if embedded else "PostgreSQL"
    print(
        f"leak: {done} open -> 3 Bad MAC -> close cycles over {phones_count} phones ({store}) in {elapsed:.1f} s "
        f"({done / elapsed:,.0f} cycles/s)"
    )
    step = max(1, len(samples) // 25)
    shown = samples[::step] if samples[-1:] == samples[::step][-1:] else [*samples[::step], samples[-1]]
    print(f"  RSS every {step} round(s) of {phones_count} (MB): " + " ".join(f"{value:.1f}" for value in shown))
    print(
        f"  after warm-up ({warmup_rounds * phones_count} cycles) {after_warmup:.1f} MB, "
        f"at the end {samples[-1]:.1f} MB, "
        f"growth {growth:+.1f}% (goal <= 5%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--embedded", action="store_true", help="the in-memory store instead of PostgreSQL")
    args = parser.parse_args()
    asyncio.run(run(args.phones, args.cycles, args.warmup, args.embedded))


if __name__ == "__main__":
    main()
