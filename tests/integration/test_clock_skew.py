"""Shared state on the database's clock: two real `serve` replicas on one database, one of them under Debian's
`faketime` ten minutes ahead. Outcomes are read with SQL on a direct connection and from /metrics with the stock
Prometheus parser."""

from __future__ import annotations

import glob
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.client import connection_update, decrypt_error
from tests.replicas import Replica, settled
from tests.seed import add_phone
from tests.waiting import eventually

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
pytestmark = pytest.mark.skipif(LIBFAKETIME is None, reason="Debian's faketime (libfaketime) is not installed")
AHEAD = 600.0
BAD_MAC = "Bad MAC"


async def clock_offset(replica: Replica) -> float:
    async with aiohttp.ClientSession() as http, http.get(replica.base + "/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        if family.name == "whatsapp_sidecar_clock_offset_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no whatsapp_sidecar_clock_offset_seconds")


async def test_a_replica_ten_minutes_ahead_changes_nothing_the_fleet_decides(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    assert LIBFAKETIME is not None
    breaker = ["--breaker-max-closes", "5", "--breaker-max-share", "0.01"]
    faked = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"+{AHEAD:.0f}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    skewed = Replica("ahead", database, tmp_path, breaker, env=faked)
    normal = Replica("on-time", database, tmp_path, breaker)
    fleet = [skewed, normal]
    await skewed.start()
    await normal.start()
    try:
        assert abs(await clock_offset(skewed) - AHEAD) < 5 and abs(await clock_offset(normal)) < 1
        assert "clock is +600" in skewed.log() or "clock is +599" in skewed.log(), skewed.log()[-2000:]

        # The breaker allows 5 automatic closes in its window, fleet-wide; 10 phones reach the limit, their
        # errors alternating between the replicas. The skewed one must not prune the other's counts.
        phones = [await add_phone(db, 1, f"7900333{index:04d}", keys=("creds",)) for index in range(10)]
        for phone in phones:
            await normal.events([connection_update(1, phone.organization_phone_id, phone.phone_jid, "open")])
        for round_ in range(3):
            for index, phone in enumerate(phones):
                await fleet[(index + round_) % 2].events(
                    [decrypt_error(1, phone.organization_phone_id, phone.phone_jid, BAD_MAC)]
                )
        await eventually(lambda: settled(fleet), what="no close in flight")
        assert await db.fetchval("SELECT count(*) FROM wa_sidecar.closures") == 5
        assert await db.fetchval("SELECT breaker_tripped_at IS NOT NULL FROM wa_sidecar.fleet_settings") is True
        tripped_at = await db.fetchval(
            "SELECT breaker_tripped_at - extract(epoch FROM now()) FROM wa_sidecar.fleet_settings"
        )
        assert abs(tripped_at) < 30  # the database's time, not ten minutes ahead

        # A logout written by the skewed replica carries the database's time: an `open` 0 s later through the
        # other replica, without a new login, is the logout not sticking.
        await normal.request("POST", "/v1/breaker", {"action": "release", "operator": "oncall", "closeHeld": False})
        fresh = await add_phone(db, 2, "79003339999", keys=("creds",))
        pid = fresh.organization_phone_id
        await skewed.events([connection_update(2, pid, fresh.phone_jid, "open")])
        await skewed.events([decrypt_error(2, pid, fresh.phone_jid, BAD_MAC)] * 3)

        async def closed() -> bool:
            phase = await db.fetchval(
                "SELECT phase FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", pid
            )
            return bool(phase == "closed")

        await eventually(closed, what="the fresh phone closed by the skewed replica")
        lag = await db.fetchval(
            "SELECT extract(epoch FROM now() - closed_at) FROM wa_sidecar.session_counters "
            "WHERE organization_phone_id = $1",
            pid,
        )
        assert 0 <= lag < 30, lag  # written on the database's clock
        await normal.events([connection_update(2, pid, fresh.phone_jid, "open")])

        async def incident() -> bool:
            count = await db.fetchval(
                "SELECT count(*) FROM wa_sidecar.decisions WHERE decision = 'reconnected_after_logout' "
                "AND organization_phone_id = $1",
                pid,
            )
            return bool(count == 1)

        await eventually(incident, what="the reconnect after the logout seen")
    finally:
        for replica in fleet:
            await replica.stop()
