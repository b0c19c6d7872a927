"""Under the windowed policy, what operators see (/metrics, /v1/sessions, stats) is the window's count: errors
that left the window stop counting and stop firing alerts, on every surface alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Extras
from sidecar.client import decrypt_error
from sidecar.rules.policy import HealthPolicy, PolicyConfig
from tests.server import serving, sidecar_config

TOKEN = "operator-token"


async def test_expired_errors_leave_metrics_sessions_and_stats(database: str) -> None:
    now = [datetime(2026, 11, 30, 12, 0, tzinfo=UTC)]
    config = sidecar_config(
        database,
        api_token=TOKEN,
        coordination="local",
        policy=PolicyConfig(health=HealthPolicy.WINDOWED, window_seconds=60),
    )
    jid = "79001112233@s.whatsapp.net"

    async def surfaces(http: aiohttp.ClientSession, base: str) -> tuple[float, int, int]:
        async with http.get(base + "/metrics") as response:
            text = await response.text()
        [gauge] = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "whatsapp_session_bad_mac_errors" and sample.labels["organization_phone_id"] == "7"
        ]
        async with http.get(base + "/v1/sessions") as response:
            [listed] = [s for s in (await response.json())["sessions"] if s["organizationPhoneId"] == 7]
        async with http.get(base + "/v1/sessions/7/stats") as response:
            stats = await response.json()
        return gauge, listed["badMacErrors"], stats["badMacErrors"]

    async with serving(config, extras=Extras(clock=lambda: now[0])) as served, aiohttp.ClientSession() as http:
        events = [
            decrypt_error(1, 7, jid, "Bad MAC", peer_jid=f"2055500{peer:08d}@s.whatsapp.net") for peer in range(2)
        ]
        async with http.post(served.base + "/v1/events", json=events, headers={"Authorization": f"Bearer {TOKEN}"}):
            pass
        await served.components.runtime.settle()
        assert await surfaces(http, served.base) == (2.0, 2, 2)
        now[0] += timedelta(seconds=120)  # both errors left the 60 s window
        assert await surfaces(http, served.base) == (0.0, 0, 0)
