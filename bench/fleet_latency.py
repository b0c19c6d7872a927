"""Fleet mode: event -> decision latency with PostgreSQL in the loop, under a steady load of counted errors.

    python -m bench.fleet_latency [--rate 1000] [--seconds 10] [--replicas 2] [--probes-per-second 50]
                                  [--locked-rows N]

`--replicas` sidecars run on one seeded database (fleet mode). Background load: `--rate` counted errors/s
(app-state bad decrypts over 1,000 phones, limit raised so nothing closes: every one is decided in a database
transaction), spread over one runtime connection per replica. Probes: single counted errors sent with
`POST /v1/events`, which answers 202 once the event's decision is committed; the round trip is the event ->
decision latency (an upper bound: it includes HTTP). Printed: achieved load, probe p50/p99/max; goal p99 <= 10 ms.
With `--locked-rows N` the run is repeated with another PostgreSQL session holding N phones' rows locked for its
whole length (as a replica cut off mid-transaction does); the load still sends their errors, the probes go to the
other phones, and the two runs' latencies are compared. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time

import aiohttp
import asyncpg
from websockets.asyncio.client import connect

from bench.common import seeded_database, sidecar_process

BAD_DECRYPT = "Error: error:1C800064:Provider routines::bad decrypt"
LIMIT = ("--max-bad-decrypt-errors", "100000000")


def counted(phone: tuple[int, int, str]) -> dict[str, object]:
    organization_id, phone_id, jid = phone
    return {"type": "decrypt.error", "organizationId": organization_id, "organizationPhoneId": phone_id,
            "phoneJid": jid, "error": BAD_DECRYPT}  # fmt: skip


async def run(rate: float, seconds: float, replicas: int, probes_per_second: float, locked: int = 0) -> float:
    """One run; returns the probes' p99 (ms)."""
    async with seeded_database(1000) as (dsn, phones), contextlib.AsyncExitStack() as stack:
        fleet = [
            await stack.enter_async_context(sidecar_process(dsn, *LIMIT, "--instance", f"replica-{index}"))
            for index in range(replicas)
        ]
        ids = [(p.organization_id, p.organization_phone_id, p.jid) for p in phones]
        if locked:
            holder = await asyncpg.connect(dsn)
            stack.push_async_callback(holder.close)
            rows = [(organization_id, phone_id) for organization_id, phone_id, _ in ids[:locked]]
            await holder.executemany(
                "INSERT INTO wa_sidecar.session_counters (organization_id, organization_phone_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                rows,
            )
            holding = holder.transaction()
            await holding.start()
            stack.push_async_callback(holding.rollback)
            await holder.execute(
                "SELECT 1 FROM wa_sidecar.session_counters WHERE organization_phone_id = ANY($1::bigint[]) FOR UPDATE",
                [phone_id for _, phone_id in rows],
            )
        free = ids[locked:]
        sockets = [await connect(s.ws_url, max_size=None, compression=None) for s in fleet]
        latencies: list[float] = []
        sent = 0
        started = time.perf_counter()

        async def load() -> None:
            nonlocal sent
            while (elapsed := time.perf_counter() - started) < seconds:
                while sent < rate * elapsed:  # paced by the clock
                    await sockets[sent % len(sockets)].send(json.dumps(counted(ids[sent % len(ids)])))
                    sent += 1
                await asyncio.sleep(0.001)

        async def probe() -> None:
            async with aiohttp.ClientSession() as http:
                index = 0
                while time.perf_counter() - started < seconds:
                    replica = fleet[index % len(fleet)]
                    body = [counted(free[(7919 * index) % len(free)])]
                    begin = time.perf_counter()
                    async with http.post(replica.base + "/v1/events", json=body) as response:
                        await response.read()
                        assert response.status == 202, response.status
                    latencies.append(1000 * (time.perf_counter() - begin))
                    index += 1
                    await asyncio.sleep(1 / probes_per_second)

        await asyncio.gather(load(), probe())
        for ws in sockets:
            await ws.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    held = f", {locked} phones' rows held locked by another session" if locked else ""
    print(f"fleet latency: {replicas} replicas on one PostgreSQL, load {sent / seconds:,.0f} counted errors/s{held}")
    print(
        f"  event -> decision (POST /v1/events answered after the commit): {len(latencies)} probes, "
        f"p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms (goal p99 <= 10 ms)"
    )
    return p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--probes-per-second", type=float, default=50)
    parser.add_argument("--locked-rows", type=int, default=0, help="repeat with this many phones' rows held locked")
    args = parser.parse_args()
    free = asyncio.run(run(args.rate, args.seconds, args.replicas, args.probes_per_second))
    if args.locked_rows:
        held = asyncio.run(run(args.rate, args.seconds, args.replicas, args.probes_per_second, args.locked_rows))
        print(f"unrelated phones' p99 with {args.locked_rows} rows held: {held / free:.2f}x the p99 without")


if __name__ == "__main__":
    main()
