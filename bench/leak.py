"""Leak check: open -> 3 Bad MAC -> close cycles over a fixed pool of phones on PostgreSQL, RSS sampled.

    python bench/leak.py [--phones 1000] [--cycles 20000] [--warmup 2000]

Each round opens every phone of the pool, sends it three Bad MAC errors, and waits until the sidecar has
closed and forgotten all of them (its API lists no session) before the next round logs them in again. The
sidecar runs as its own process; its RSS is sampled after every round. Printed: RSS after warm-up, at the
end, and the growth between them (goal: <= 5%). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp

from bench.common import NO_BREAKER, rss_mb, seeded_database, sidecar_process
from sidecar.client import RuntimeClient, connection_update, decrypt_error


async def run(phones_count: int, cycles: int, warmup: int) -> None:
    rounds = max(1, cycles // phones_count)
    warmup_rounds = max(1, warmup // phones_count)
    async with seeded_database(phones_count) as (dsn, phones), sidecar_process(dsn, *NO_BREAKER) as sidecar:
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
    print(
        f"leak: {done} open -> 3 Bad MAC -> close cycles over {phones_count} phones in {elapsed:.1f} s "
        f"({done / elapsed:,.0f} cycles/s)"
    )
    print("  RSS per round (MB): " + " ".join(f"{value:.1f}" for value in samples))
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
    args = parser.parse_args()
    asyncio.run(run(args.phones, args.cycles, args.warmup))


if __name__ == "__main__":
    main()
