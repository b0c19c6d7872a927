"""State change -> owner webhook latency: direct signed webhook vs Prometheus + Alertmanager.

    python -m bench.notify_latency [--sessions 1000] [--rate 200]

One run, same flips, two paths to two receiver routes of one loopback receiver:
- direct: the sidecar's own `session.unhealthy` webhook (PostgreSQL outbox, signed, verified on arrival);
- alerting: a real Prometheus (1 s scrape and evaluation, alerts/whatsapp-session.rules.yml) and a real
  Alertmanager (group_wait 1 s, grouped by organization) sending WhatsAppSessionBadMacErrors (the shipped
  rule for the same flip: 2 Bad MAC errors; WhatsAppSessionUnhealthy waits `for: 2m`) to a webhook.
Each session is flipped unhealthy (two Bad MAC errors) at a recorded time; latency is first arrival of that
session on each path minus that time. Prints p50/p99 per path and their ratio. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from bench.common import free_port, seeded_database, sidecar_process
from sidecar.client import RuntimeClient, connection_update, decrypt_error
from tests.monitoring import alertmanager, prometheus

SECRET = b"bench-secret"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction) - 1)]


async def run(sessions: int, rate: float) -> None:
    direct: dict[int, float] = {}
    alerting: dict[int, float] = {}
    forged = 0

    async def on_direct(request: web.Request) -> web.Response:
        nonlocal forged
        body = await request.read()
        try:
            Webhook(SECRET).verify(body, dict(request.headers))
        except WebhookVerificationError:
            forged += 1
            return web.Response(status=401)
        item = json.loads(body)
        if item["event"] == "session.unhealthy":
            direct.setdefault(item["organizationPhoneId"], time.time())
        return web.Response()

    async def on_alertmanager(request: web.Request) -> web.Response:
        now = time.time()
        for alert in (await request.json())["alerts"]:
            if alert["labels"].get("alertname") == "WhatsAppSessionBadMacErrors":
                alerting.setdefault(int(alert["labels"]["organization_phone_id"]), now)
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/direct", on_direct)
    receiver.router.add_post("/alertmanager", on_alertmanager)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    receiver_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
    work = Path(tempfile.mkdtemp(prefix="wa-bench-notify-"))
    (work / "secret").write_bytes(SECRET)
    (work / "owners.yaml").write_text(
        f"defaultTeam: platform\nteams:\n  platform:\n    webhookUrl: http://127.0.0.1:{receiver_port}/direct\n"
        f"    secretFile: {work / 'secret'}\n"
    )
    am_config = (
        "route:\n  receiver: hook\n  group_by: [organization_id]\n  group_wait: 1s\n  group_interval: 1s\n"
        "  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n"
        f"      - url: http://127.0.0.1:{receiver_port}/alertmanager\n        send_resolved: false\n"
    )
    try:
        async with (
            seeded_database(sessions) as (dsn, phones),
            sidecar_process(dsn, "--owners-file", str(work / "owners.yaml")) as sidecar,
            alertmanager(am_config) as manager,
            prometheus([sidecar.base.removeprefix("http://")], manager.base) as server,
            RuntimeClient(sidecar.ws_url) as client,
        ):
            for phone in phones:
                await client.send(
                    connection_update(phone.organization_id, phone.organization_phone_id, phone.jid, "open")
                )
            await client.flush()
            while not await server.query(f"sum(whatsapp_sidecar_connected_sessions) == {sessions}"):  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # until Prometheus has scraped every session connected
            flipped: dict[int, float] = {}
            for phone in phones:
                ids = (phone.organization_id, phone.organization_phone_id, phone.jid)
                await client.send(decrypt_error(*ids, "Bad MAC"))
                flipped[phone.organization_phone_id] = time.time()
                await client.send(decrypt_error(*ids, "Bad MAC"))
                await client.flush()
                await asyncio.sleep(1 / rate)
            deadline = time.monotonic() + 60
            while (len(direct) < sessions or len(alerting) < sessions) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    direct_ms = [1000 * (direct[p] - flipped[p]) for p in direct]
    alerting_ms = [1000 * (alerting[p] - flipped[p]) for p in alerting]
    print(f"notify latency: {sessions} flips at {rate:.0f}/s, one run; forged signatures seen: {forged}")
    for name, values in (("direct webhook", direct_ms), ("prometheus+alertmanager", alerting_ms)):
        if values:
            print(
                f"  {name:>24}: {len(values)} arrived, p50 {statistics.median(values):.1f} ms, "
                f"p99 {percentile(values, 0.99):.1f} ms"
            )
        else:
            print(f"  {name:>24}: nothing arrived")
    if direct_ms and alerting_ms:
        print(
            f"  ratio (alerting / direct): p50 {statistics.median(alerting_ms) / statistics.median(direct_ms):.0f}x, "
            f"p99 {percentile(alerting_ms, 0.99) / percentile(direct_ms, 0.99):.0f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="flips per second")
    args = parser.parse_args()
    asyncio.run(run(args.sessions, args.rate))


if __name__ == "__main__":
    main()
