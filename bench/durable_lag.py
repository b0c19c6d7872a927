"""Accepted -> durable lag: how far PostgreSQL trails what the sidecar answered 202 for, under load.

    python -m bench.durable_lag [--senders 40] [--seconds 10] [--phones 5000] [--batch 1] [--coordination local]

`--senders` HTTP clients post `POST /v1/events` back to back for `--seconds` (`--batch` Bad MACs each, over
`--phones` phones, limits raised so every event is a counted error with its heal: two database steps). With
`--coordination local` (one replica) those steps go through the pending queue after the 202; in fleet mode
the 202 waits for the decision's transaction. Meanwhile /metrics is read every 50 ms: the age of the oldest
step not yet applied (whatsapp_sidecar_pending_step_age_seconds) is the lag at that moment. Printed: events
accepted and their rate, the lag's p50/p99/max over the samples, how long after the burst the backlog took to
clear, and the first sample with anything durable. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.common import seeded_database, sidecar_process

LIMITS = ("--max-bad-mac-errors", "100000000", "--max-bad-decrypt-errors", "100000000", "--breaker-max-closes", "1")


def gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise KeyError(name)


async def run(args: argparse.Namespace) -> None:
    async with (
        seeded_database(args.phones) as (dsn, phones),
        sidecar_process(dsn, *LIMITS, "--coordination", args.coordination) as sidecar,
        aiohttp.ClientSession(sidecar.base, connector=aiohttp.TCPConnector(limit=args.senders + 4)) as http,
    ):
        accepted = 0
        stop = time.monotonic() + args.seconds
        lags: list[float] = []
        depths: list[float] = []

        async def sender(offset: int) -> None:
            nonlocal accepted
            index = offset
            while time.monotonic() < stop:
                chosen = [phones[(index + n * args.senders) % len(phones)] for n in range(args.batch)]
                index += args.senders * args.batch
                body = [{"type": "decrypt.error", "organizationId": phone.organization_id,
                         "organizationPhoneId": phone.organization_phone_id, "phoneJid": phone.jid,
                         "error": "Bad MAC"} for phone in chosen]  # fmt: skip
                async with http.post("/v1/events", json=body) as response:
                    if response.status == 202:
                        accepted += len(body)

        async def sample_until(condition: float) -> None:
            while time.monotonic() < condition:
                async with http.get("/metrics") as response:
                    text = await response.text()
                lags.append(gauge(text, "whatsapp_sidecar_pending_step_age_seconds"))
                depths.append(gauge(text, "whatsapp_sidecar_pending_database_steps"))
                await asyncio.sleep(0.05)

        started = time.monotonic()
        await asyncio.gather(*(sender(n) for n in range(args.senders)), sample_until(stop))
        burst = time.monotonic() - started
        drained_at = time.monotonic()
        while True:
            async with http.get("/metrics") as response:
                text = await response.text()
            if gauge(text, "whatsapp_sidecar_pending_database_steps") == 0:
                break
            lags.append(gauge(text, "whatsapp_sidecar_pending_step_age_seconds"))
            await asyncio.sleep(0.05)
        cleared = time.monotonic() - drained_at
    lags.sort()
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
    print(
        f"durable lag ({args.coordination}): {accepted:,} events accepted by {args.senders} HTTP senders "
        f"({args.batch} per request) in "
        f"{burst:.1f} s ({accepted / burst:,.0f}/s)"
    )
    print(
        f"  oldest pending step age over {len(lags)} samples: p50 {statistics.median(lags):.3f} s, "
        f"p99 {p99:.3f} s, max {lags[-1]:.3f} s (goal p99 <= 1 s); peak queue {max(depths):,.0f} steps"
    )
    print(f"  backlog cleared {cleared:.2f} s after the burst ended")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--phones", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=1, help="events per request")
    parser.add_argument("--coordination", choices=("local", "fleet"), default="local")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
