"""End to end: runtime client -> sidecar -> real Prometheus (shipped rules) -> real Alertmanager (example config)
-> loopback receivers per team. Then every dashboard query against the same live Prometheus."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from aiohttp import web

from dashboards.generate import DASHBOARDS
from sidecar.client import (
    RuntimeClient,
    account_restriction,
    activity,
    connection_update,
    decrypt_error,
    message_recovered,
)
from tests.monitoring import ALERTMANAGER_EXAMPLE, SCRAPE_JOB, Prometheus, alertmanager, prometheus
from tests.receiver import verified
from tests.seed import SeededPhone, add_phone
from tests.server import serving, sidecar_config
from tests.waiting import eventually

SECRET = b"e2e-secret"


@dataclass
class Arrival:
    at: float
    receiver: str
    labels: dict[str, str]
    status: str


@dataclass
class Receivers:
    """Alertmanager's webhook receivers (one path per team) and the sidecar's own signed owner webhook."""

    base: str = ""
    alerts: list[Arrival] = field(default_factory=list)
    owner_events: list[dict[str, Any]] = field(default_factory=list)

    def arrived(self, alertname: str, **labels: str) -> list[Arrival]:
        return [
            item
            for item in self.alerts
            if item.labels.get("alertname") == alertname
            and item.status == "firing"
            and all(item.labels.get(key) == value for key, value in labels.items())
        ]


@asynccontextmanager
async def receivers() -> AsyncIterator[Receivers]:
    state = Receivers()

    async def alertmanager_hook(request: web.Request) -> web.Response:
        now = time.time()
        for alert in (await request.json())["alerts"]:
            state.alerts.append(Arrival(now, request.match_info["team"], alert["labels"], alert["status"]))
        return web.Response()

    async def owner_hook(request: web.Request) -> web.Response:
        body = await request.read()
        if verified(SECRET, request.headers, body) is None:
            return web.Response(status=401)
        state.owner_events.append(json.loads(body))
        return web.Response()

    app = web.Application()
    app.router.add_post("/alertmanager/{team}", alertmanager_hook)
    app.router.add_post("/owners", owner_hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


def alertmanager_config(receiver_base: str) -> str:
    """The shipped example with its receivers pointed at loopback and its waits shortened for a test."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())
    config["route"] |= {"group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"}
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{receiver_base}/alertmanager/{receiver['name']}"
    return str(yaml.safe_dump(config))


def owners(tmp_path: Path, receiver_base: str) -> Path:
    (tmp_path / "secret").write_bytes(SECRET)
    path = tmp_path / "owners.yaml"
    path.write_text(
        "defaultTeam: platform\nteams:\n"
        f"  platform:\n    webhookUrl: {receiver_base}/owners\n    secretFile: {tmp_path / 'secret'}\n"
        f"  sales:\n    webhookUrl: {receiver_base}/owners\n    secretFile: {tmp_path / 'secret'}\n"
        'organizations:\n  "7": sales\n'
    )
    return path


def substituted(expr: str, phone_id: int) -> str:
    """Grafana's variables as a user with everything selected would send them."""
    for name, value in (
        ("$__rate_interval", "1m"),
        ("$organization_phone_id", str(phone_id)),
        ("$organization_id", ".*"),
        ("$team", ".*"),
        ("$job", SCRAPE_JOB),
        ("$instance", ".*"),
        ("$cluster", ".*"),
    ):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


async def check_dashboards(server: Prometheus, phone_id: int) -> dict[str, int]:
    """Every panel query parses and returns data; every variable query finds values. Returns series per query."""
    found: dict[str, int] = {}
    for name, build in DASHBOARDS.items():
        dashboard = build()
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()  # type: ignore[union-attr]
            values = await server.api(f"label/{label}/values", **{"match[]": substituted(metric, phone_id)})
            if variable["name"] != "cluster":  # optional: this Prometheus adds no cluster label (All matches none)
                assert values, f"{name}: variable {variable['name']} finds no values"
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):  # rows have none
                result = await server.query(substituted(target["expr"], phone_id))
                found[f"{name} / {panel['title']} / {target['refId']}"] = len(result)
    return found


async def test_two_bad_macs_alert_the_owning_team_one_does_not_and_a_close_is_critical(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    quiet = await add_phone(db, 7, "79001110001")  # 1 Bad MAC: nothing may arrive
    sales = await add_phone(db, 7, "79001110002")  # 2 Bad MAC -> sales; a 3rd closes it
    platform = await add_phone(db, 1, "79001110003")  # 2 Bad MAC -> platform; stays up for the dashboards
    fleet = (quiet, sales, platform)

    def ids(phone: SeededPhone) -> tuple[int, int, str]:
        return phone.organization_id, phone.organization_phone_id, phone.phone_jid

    async with receivers() as received:
        config = sidecar_config(database, owners_file=owners(tmp_path, received.base), loss_deadline=1.0)
        async with (
            alertmanager(alertmanager_config(received.base)) as manager,
            serving(config) as sidecar,
            prometheus([sidecar.base.removeprefix("http://")], manager.base) as server,
            RuntimeClient(sidecar.ws_url, library=("baileys", "7.0.0-rc14")) as runtime,
        ):

            async def scraped(expr: str) -> bool:
                return bool(await server.query(expr))

            for phone in fleet:
                await runtime.send(connection_update(*ids(phone), "open"))
                await runtime.send(activity(*ids(phone), datetime.now(UTC), messages=3))  # inbound traffic
            # the restriction panels: the platform phone's new-chat messages are capped for a day
            until = datetime.now(UTC) + timedelta(days=1)
            await runtime.send(account_restriction(*ids(platform), "message_cap", until=until, detail="CAPPED"))
            # the message-loss panel: two failed messages (a class that counts toward no limit), one recovered
            for message_id in ("3EB0L0SS1", "3EB0L0SS2"):
                await runtime.send(decrypt_error(*ids(platform), "No session record", message_id=message_id))
            await runtime.send(message_recovered(*ids(platform), "3EB0L0SS1", "retry"))
            await runtime.flush()
            # the default --session-metrics active: idle sessions have no series of their own, the fleet family counts
            await eventually(lambda: scraped("sum(whatsapp_sidecar_connected_sessions) == 3"), what="fleet scraped")

            await runtime.send(decrypt_error(*ids(quiet), "Bad MAC"))
            await runtime.flush()
            quiet_id = str(quiet.organization_phone_id)
            await eventually(
                lambda: scraped(f'whatsapp_session_bad_mac_errors{{organization_phone_id="{quiet_id}"}} == 1'),
                what="1 Bad MAC scraped",
            )

            second_error_at: dict[str, float] = {}
            for phone in (sales, platform):
                for _ in range(2):
                    await runtime.send(decrypt_error(*ids(phone), "Bad MAC"))
                await runtime.flush()
                second_error_at[str(phone.organization_phone_id)] = time.time()
            sales_id, platform_id = str(sales.organization_phone_id), str(platform.organization_phone_id)

            async def firing_in_prometheus() -> bool:
                data = await server.api("alerts")
                active = {
                    a["labels"].get("organization_phone_id"): a["activeAt"]
                    for a in data["alerts"]
                    if a["labels"]["alertname"] == "WhatsAppSessionBadMacErrors" and a["state"] == "firing"
                }
                return sales_id in active and platform_id in active

            await eventually(firing_in_prometheus, what="Prometheus fires the Bad MAC alert for both sessions")
            firing_seen_at = time.time()
            await eventually(
                lambda: (
                    bool(received.arrived("WhatsAppSessionBadMacErrors", organization_phone_id=sales_id))
                    and bool(received.arrived("WhatsAppSessionBadMacErrors", organization_phone_id=platform_id))
                ),
                what="Bad MAC alerts at the receivers",
            )
            sales_alert = received.arrived("WhatsAppSessionBadMacErrors", organization_phone_id=sales_id)[0]
            platform_alert = received.arrived("WhatsAppSessionBadMacErrors", organization_phone_id=platform_id)[0]
            assert (sales_alert.receiver, sales_alert.labels["team"]) == ("sales", "sales")
            assert (platform_alert.receiver, platform_alert.labels["team"]) == ("platform", "platform")
            assert sales_alert.labels["severity"] == "warning"
            assert sales_alert.labels["organization_id"] == "7"
            assert "79001110002" not in json.dumps([a.labels for a in received.alerts]), "no phone numbers"
            # The 1-error session was scraped before the 2-error ones and evaluated by the same rule: nothing for it.
            assert not [a for a in received.alerts if a.labels.get("organization_phone_id") == quiet_id]
            assert not await server.query(f'ALERTS{{organization_phone_id="{quiet_id}"}}')
            print(
                f"\nalert timeline from the 2nd Bad MAC error (session {sales_id}, team sales):"
                f"\n  firing in Prometheus seen by +{firing_seen_at - second_error_at[sales_id]:.2f}s"
                f"\n  at the sales receiver      +{sales_alert.at - second_error_at[sales_id]:.2f}s"
                f"\n  platform session {platform_id}  +{platform_alert.at - second_error_at[platform_id]:.2f}s"
            )

            await runtime.send(decrypt_error(*ids(sales), "Bad MAC"))
            await runtime.flush()
            closed_at = time.time()
            await eventually(
                lambda: bool(received.arrived("WhatsAppSessionClosedByCryptoErrors", organization_id="7")),
                what="critical close alert at the sales receiver",
            )
            close_alert = received.arrived("WhatsAppSessionClosedByCryptoErrors", organization_id="7")[0]
            assert close_alert.receiver == "sales"
            expected = {"severity": "critical", "team": "sales", "reason": "bad_mac_limit"}
            assert close_alert.labels.items() >= expected.items()
            print(f"  close -> critical alert at the sales receiver +{close_alert.at - closed_at:.2f}s")
            owner_events = {(e["event"], e["organizationPhoneId"]) for e in received.owner_events}
            assert ("session.unhealthy", sales.organization_phone_id) in owner_events

            found = await check_dashboards(server, platform.organization_phone_id)
            empty = sorted(query for query, series in found.items() if series == 0)
            assert not empty, f"dashboard queries without data: {empty}"
            print(f"  dashboards: {len(found)} panel queries, every one returned data ({sum(found.values())} series)")
