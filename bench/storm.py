"""Error storm: N sessions each sent E Bad MAC / bad decrypt errors as fast as the SDK can send them.

    python -m bench.storm [--sessions 1000] [--errors 200] [--connections 4] [--replicas 1,2]
                          [--poolers none,transaction]

The sidecar runs as its own process (`wa-sidecar serve`, PostgreSQL with the seed schema, 8 keys per phone),
so its RSS is its own. With `--replicas 1,2` the storm runs once per replica count, each on a fresh database
(fleet mode: the replicas share it; the runtime connections are spread over them), and the event rates are
compared; with `--poolers none,transaction` once directly and once through Debian's PgBouncer in transaction mode
(`--database-pooler transaction`, as many server connections as the replicas' pools), in the same run. Printed:
idle and peak RSS (of the first replica), the storm's duration, closes/s, the time until the
database is consistent (every closure recorded, every key gone), the stats API latency (p50/p99, polled
throughout), and the consistency checks (every session ended exactly once, every phone logged out, every key
gone, one closure record per phone). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import statistics
import time
from typing import Any

import aiohttp
import asyncpg

from bench.common import NO_BREAKER, Phone, RssSampler, rss_mb, seeded_database, sidecar_process
from sidecar.client import RuntimeClient, connection_update, decrypt_error
from tests.pgbouncer import PgBouncer

BAD_DECRYPT = "Error: error:1C800064:Provider routines::bad decrypt"


async def run(sessions: int, errors: int, connections: int, replicas: int, pooler: str = "none") -> float:
    """One storm; returns the sidecar's event rate."""
    async with seeded_database(sessions) as (dsn, phones), contextlib.AsyncExitStack() as stack:
        url, flags = dsn, ["--database-pooler", pooler]
        if pooler != "none":
            bouncer = PgBouncer(pool_mode=pooler, pool_size=10 * replicas)
            await bouncer.start()
            stack.push_async_callback(bouncer.remove)
            url = bouncer.url(dsn)
        fleet = [
            await stack.enter_async_context(sidecar_process(url, *NO_BREAKER, *flags, "--instance", f"replica-{index}"))
            for index in range(replicas)
        ]
        sidecar = fleet[0]
        ends: collections.Counter[int] = collections.Counter()
        last_end = 0.0

        def ended(command: dict[str, Any]) -> None:
            nonlocal last_end
            ends[command["organizationPhoneId"]] += 1
            last_end = time.perf_counter()

        clients = [RuntimeClient(fleet[i % replicas].ws_url, on_session_end=ended) for i in range(connections)]
        for client in clients:
            await client.start()
            await client.wait_connected()
        for index, phone in enumerate(phones):
            await clients[index % connections].send(
                connection_update(phone.organization_id, phone.organization_phone_id, phone.jid, "open")
            )
        for client in clients:
            await client.flush()
        await asyncio.sleep(1)
        idle = rss_mb(sidecar.pid)
        sampler = RssSampler(sidecar.pid)
        sampler.start()
        latencies: list[float] = []
        storming = True

        async def poll_stats() -> None:
            rng = random.Random(1)
            async with aiohttp.ClientSession() as http:
                while storming:
                    phone = rng.choice(phones)
                    start = time.perf_counter()
                    base = rng.choice(fleet).base
                    async with http.get(f"{base}/v1/sessions/{phone.organization_phone_id}/stats") as response:
                        await response.read()
                        assert response.status == 200, response.status
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.005)

        async def storm(client: RuntimeClient, mine: list[Phone], seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(errors):
                for phone in mine:
                    text = "Bad MAC" if rng.random() < 0.5 else BAD_DECRYPT
                    ids = (phone.organization_id, phone.organization_phone_id, phone.jid)
                    await client.send(decrypt_error(*ids, text))
            await client.flush(timeout=600)

        poller = asyncio.create_task(poll_stats())
        started = time.perf_counter()
        await asyncio.gather(*(storm(c, phones[i::connections], i) for i, c in enumerate(clients)))
        sent = time.perf_counter()
        while len(ends) < len(phones) and time.perf_counter() - started < 600:  # noqa: ASYNC110 - a poll with a deadline
            await asyncio.sleep(0.05)
        # Every event has been written; wait for the sidecars to have processed them all.
        async with aiohttp.ClientSession() as http:
            total = 0.0
            while time.perf_counter() - started < 600:
                total = 0.0
                for replica in fleet:
                    async with http.get(replica.base + "/metrics") as response:
                        text = await response.text()
                    total += sum(
                        float(line.rsplit(" ", 1)[1])
                        for line in text.splitlines()
                        if line.startswith("whatsapp_sidecar_events_total{") and 'channel="websocket"' in line
                    )
                if total >= sessions * (errors + 1) + sum(ends.values()):  # events + opens + acks
                    break
                await asyncio.sleep(0.1)
        processed = time.perf_counter()
        storming = False
        await poller
        await sampler.stop()
        for client in clients:
            await client.stop()
        db = await asyncpg.connect(dsn)
        try:
            for _ in range(6000):  # the database half of the last closes may still be on its way
                recorded = await db.fetchval("SELECT count(*) FROM wa_sidecar.closures")
                if recorded >= sessions and not await db.fetchval("SELECT count(*) FROM baileys_auth"):
                    break
                await asyncio.sleep(0.01)
            consistent = time.perf_counter()
            keys = await db.fetchval("SELECT count(*) FROM baileys_auth")
            not_out = await db.fetchval("""SELECT count(*) FROM "OrganizationPhone" WHERE status <> 'logged_out'""")
            closures = await db.fetch("SELECT organization_phone_id, count(*) AS n FROM wa_sidecar.closures GROUP BY 1")
        finally:
            await db.close()
    events = sessions * errors
    latencies.sort()
    mode = f"fleet mode, {replicas} replica{'s' if replicas > 1 else ''} on one PostgreSQL"
    mode += f", through PgBouncer ({pooler} mode)" if pooler != "none" else ", direct"
    print(f"storm ({mode}): {sessions} sessions x {errors} errors = {events} events over {connections} connections")
    elapsed = processed - started
    print(
        f"  events written by the clients in {sent - started:.2f} s; processed by the sidecar in {elapsed:.2f} s "
        f"({events / elapsed:,.0f} events/s)"
    )
    print(
        f"  all {len(ends)} sessions ended (session.end acked) {last_end - started:.2f} s after the first error "
        f"({len(ends) / (last_end - started):,.0f} closes/s)"
    )
    print(f"  database consistent (every closure recorded, every key gone) {consistent - started:.2f} s after start")
    print(f"  RSS idle {idle:.1f} MB, peak {sampler.peak:.1f} MB (+{sampler.peak - idle:.1f} MB; goal +50 MB)")
    print(
        f"  stats API during the storm: {len(latencies)} requests, p50 {1000 * statistics.median(latencies):.1f} ms, "
        f"p99 {1000 * latencies[int(len(latencies) * 0.99) - 1]:.1f} ms (goal p99 <= 100 ms)"
    )
    exactly_once = set(ends.values()) == {1} and len(ends) == sessions
    one_record = len(closures) == sessions and {row["n"] for row in closures} == {1}
    print(
        f"  consistency: session.end exactly once each: {exactly_once}; phones not logged out: {not_out}; "
        f"keys left: {keys}; one closure record per phone: {one_record}"
    )
    return events / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--errors", type=int, default=200)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--replicas", default="1", help="replica counts to run, comma-separated (e.g. 1,2)")
    parser.add_argument("--poolers", default="none", help="none and/or transaction, comma-separated")
    args = parser.parse_args()
    counts = [int(item) for item in args.replicas.split(",")]
    poolers = args.poolers.split(",")
    rates = {
        (count, pooler): asyncio.run(run(args.sessions, args.errors, max(args.connections, count), count, pooler))
        for pooler in poolers
        for count in counts
    }
    for pooler in poolers:
        base = rates[(counts[0], pooler)]
        for count in counts[1:]:
            through = "" if pooler == "none" else f" through PgBouncer ({pooler})"
            print(f"{count} replicas{through}: {rates[(count, pooler)] / base:.2f}x the event rate of {counts[0]}")
    for count in counts:
        for pooler in poolers[1:]:
            ratio = rates[(count, pooler)] / rates[(count, poolers[0])]
            print(f"{count} replica(s) through PgBouncer ({pooler}): {ratio:.2f}x the event rate with {poolers[0]}")


if __name__ == "__main__":
    main()
