"""Deaf sessions through the real link (the Python SDK as the runtime) and a real PostgreSQL: a busy session that
goes silent is probed, found deaf, restarted (never logged out) and reported recovered when traffic flows again;
an idle session is never flagged; observe mode only reports; a fleet-wide silence trips the restart breaker."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from sidecar.client import Command, RuntimeClient, activity, connection_update
from sidecar.rules.liveness import DeafAction, LivenessConfig
from sidecar.rules.safety import BreakerConfig, Mode
from sidecar.telemetry.exported import SessionMetrics
from tests.integration.test_notifications import SECRET, owners_file
from tests.receiver import receiving
from tests.seed import add_phone, phone_row
from tests.server import Served, serving, sidecar_config
from tests.waiting import eventually

FAST = LivenessConfig(floor_seconds=0.8, gap_factor=2, confirm_seconds=0.5, min_reports=3, min_history_seconds=0.3)
TRAFFIC_EVERY = 0.1


@dataclass
class FakeBackend:
    """A runtime's behaviour toward the sidecar: traffic per phone while it is delivered, probes answered, and a
    restart handled the way Baileys backends do (close 515, reconnect, open)."""

    jids: dict[int, str]
    delivering: set[int] = field(default_factory=set)
    probes: list[int] = field(default_factory=list)
    restarts: list[int] = field(default_factory=list)
    probe_fails: bool = False
    heal_on_restart: bool = True
    probes_supported: bool = True  # False: an older runtime, which acks session.probe "unsupported: …"
    client: RuntimeClient | None = None

    async def probe(self, command: Command) -> float:
        self.probes.append(int(command["organizationPhoneId"]))
        if self.probe_fails:
            raise TimeoutError("the stand-in stopped answering")
        return 4.5

    async def restart(self, command: Command) -> None:
        phone = int(command["organizationPhoneId"])
        assert command["statusCode"] == 515 and command["reason"] == "deaf"
        self.restarts.append(phone)
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, self._reconnect(phone))

    async def _reconnect(self, phone: int) -> None:
        assert self.client is not None
        await self.client.send(connection_update(1, phone, self.jids[phone], "close", 515))
        await self.client.send(connection_update(1, phone, self.jids[phone], "open"))
        if self.heal_on_restart:
            self.delivering.add(phone)

    async def traffic(self) -> None:
        assert self.client is not None
        while True:
            now = datetime.now(UTC)
            for phone in sorted(self.delivering):
                await self.client.send(activity(1, phone, self.jids[phone], now, messages=2, receipts=1))
            await asyncio.sleep(TRAFFIC_EVERY)


@contextlib.asynccontextmanager
async def backend(served: Served, jids: dict[int, str], **options: Any) -> AsyncIterator[FakeBackend]:
    fake = FakeBackend(jids, **options)
    client = RuntimeClient(
        served.ws_url, on_session_probe=fake.probe if fake.probes_supported else None,
        on_session_restart=fake.restart, reconnect_initial=0.05,
    )  # fmt: skip
    fake.client = client
    await client.start()
    await client.wait_connected()
    for phone, jid in jids.items():
        await client.send(connection_update(1, phone, jid, "open"))
    traffic = asyncio.create_task(fake.traffic())
    try:
        yield fake
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
        await client.stop()


async def metric(served: Served, name: str, labels: dict[str, str] | None = None) -> float:
    async with aiohttp.ClientSession() as http, http.get(served.base + "/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


def decisions(log: Path, name: str) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [entry for entry in map(json.loads, lines) if entry.get("decision") == name]


async def test_a_silent_busy_session_is_restarted_and_recovers_while_an_idle_one_is_never_flagged(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    busy, idle = await add_phone(db, 1, "79001112233"), await add_phone(db, 1, "79001114455")
    jids = {busy.organization_phone_id: busy.phone_jid, idle.organization_phone_id: idle.phone_jid}
    log = tmp_path / "closures.jsonl"
    async with receiving(SECRET) as receiver:
        config = sidecar_config(
            database, owners_file=owners_file(tmp_path, receiver.url), webhook_backoff_initial=0.05,
            closure_log_path=log, liveness=FAST, liveness_tick=0.05, deaf_action=DeafAction.RESTART,
            session_metrics=SessionMetrics.ALL,  # the idle session's series too
        )  # fmt: skip
        async with serving(config) as served, backend(served, jids) as fake:
            fake.delivering.add(busy.organization_phone_id)
            await eventually(
                lambda: served.components.runtime.liveness.watched_count == 2, what="both sessions watched"
            )
            await eventually(lambda: _reports(served, busy.organization_phone_id) >= 5, what="a baseline")
            silenced_at = asyncio.get_running_loop().time()
            fake.delivering.discard(busy.organization_phone_id)  # the stand-in stops delivering; pings still answer
            await eventually(lambda: fake.restarts == [busy.organization_phone_id], what="the deaf session restarted")
            detected_after = asyncio.get_running_loop().time() - silenced_at
            recovered = lambda: bool(decisions(log, "session.deaf_recovered"))  # noqa: E731
            await eventually(recovered, what="recovered once traffic flows")
            await eventually(lambda: receiver.events.count("session.deaf_recovered") == 1, what="recovery webhook")
            assert await metric(served, "whatsapp_session_incidents_total", {"kind": "deaf"}) == 1
            assert await metric(served, "whatsapp_sidecar_deaf_sessions") == 0
            last_inbound = await metric(
                served,
                "whatsapp_session_last_inbound_timestamp_seconds",
                {"organization_phone_id": str(busy.organization_phone_id)},
            )
            assert abs(last_inbound - datetime.now(UTC).timestamp()) < 5
    # Probed (a successful probe only buys time), then deaf past the confirmation, within the configured bounds.
    assert fake.probes[0] == busy.organization_phone_id
    assert FAST.floor_seconds < detected_after < FAST.floor_seconds + FAST.confirm_seconds + 2.0
    assert idle.organization_phone_id not in fake.probes, "an idle session is never probed"
    deaf = decisions(log, "deaf")
    assert [entry["organizationPhoneId"] for entry in deaf] == [busy.organization_phone_id]
    assert deaf[0]["detail"]["why"] == "silent past a successful probe" and deaf[0]["detail"]["probeRoundTripMs"] == 4.5
    assert decisions(log, "session.restarted")[0]["detail"]["socket"] == "restarted"
    assert receiver.events.count("session.deaf") == 1 and receiver.forged == 0
    deaf_hook = next(item for item in receiver.received if item["event"] == "session.deaf")
    assert deaf_hook["organizationPhoneId"] == busy.organization_phone_id
    assert (await phone_row(db, busy))["status"] == "connected", "a restart is never a logout"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r for r in records if "decision" not in r] == [], "no closure record: nothing was closed"


def _reports(served: Served, phone_id: int) -> int:
    return served.components.runtime.liveness.reports(phone_id)


async def test_a_failed_probe_is_a_verdict_and_observe_mode_only_reports(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001116677")
    log = tmp_path / "closures.jsonl"
    config = sidecar_config(
        database, closure_log_path=log, liveness=FAST, liveness_tick=0.05, deaf_action=DeafAction.RESTART,
        mode=Mode.OBSERVE,
    )  # fmt: skip
    async with serving(config) as served, backend(served, {phone.organization_phone_id: phone.phone_jid}) as fake:
        fake.probe_fails = True
        fake.delivering.add(phone.organization_phone_id)
        await eventually(lambda: _reports(served, phone.organization_phone_id) >= 5, what="a baseline")
        fake.delivering.clear()
        observed = lambda: bool(decisions(log, "session.restart_observed"))  # noqa: E731
        await eventually(observed, what="observe mode reports the restart")
        assert await metric(served, "whatsapp_sidecar_deaf_sessions") == 1
    deaf = decisions(log, "deaf")
    assert len(deaf) == 1 and deaf[0]["detail"]["why"].startswith("probe failed")
    assert fake.restarts == [], "observe mode restarts nothing"


async def test_a_fleet_wide_silence_trips_the_restart_breaker_instead_of_restarting_everything(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phones = [await add_phone(db, 1, f"7900222{index:04d}") for index in range(12)]
    jids = {phone.organization_phone_id: phone.phone_jid for phone in phones}
    log = tmp_path / "closures.jsonl"
    config = sidecar_config(
        database, closure_log_path=log, liveness=FAST, liveness_tick=0.05, deaf_action=DeafAction.RESTART,
        breaker=BreakerConfig(max_closes=3, max_share=0.01, window_seconds=300),
    )  # fmt: skip
    async with serving(config) as served, backend(served, jids, heal_on_restart=False) as fake:
        fake.delivering.update(jids)
        await eventually(lambda: all(_reports(served, p) >= 5 for p in jids), what="baselines")
        fake.delivering.clear()  # WhatsApp-side outage: every session silent at once
        await eventually(lambda: len(decisions(log, "deaf")) == len(jids), what="every session found deaf")
        await eventually(lambda: len(decisions(log, "session.restart_held")) == len(jids) - 3, what="the rest held")
        assert await metric(served, "whatsapp_sidecar_restart_breaker_tripped") == 1
        assert len(decisions(log, "restart_breaker.tripped")) == 1
        assert await metric(served, "whatsapp_sidecar_breaker_tripped") == 0, "logouts are a separate budget"
    assert len(fake.restarts) == 3


async def test_a_runtime_that_cannot_probe_is_judged_on_silence_alone_never_on_the_refusal(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An older runtime acks session.probe `unsupported: …` (the SDK without a probe handler does): that is not a
    verdict. The session is deaf only once its silence also outlasts the confirmation window; an operator's probe
    is answered 501, naming the reason."""
    quiet, other = await add_phone(db, 1, "79001118899"), await add_phone(db, 1, "79001118800")
    jids = {quiet.organization_phone_id: quiet.phone_jid, other.organization_phone_id: other.phone_jid}
    log = tmp_path / "closures.jsonl"
    slow = LivenessConfig(floor_seconds=0.8, gap_factor=2, confirm_seconds=1.5, min_reports=3, min_history_seconds=0.3)
    config = sidecar_config(
        database, api_token="operator", closure_log_path=log, liveness=slow, liveness_tick=0.05,
    )  # fmt: skip
    async with serving(config) as served, backend(served, jids, probes_supported=False) as fake:
        fake.delivering.update(jids)
        await eventually(lambda: _reports(served, quiet.organization_phone_id) >= 5, what="a baseline")
        silenced_at = asyncio.get_running_loop().time()
        fake.delivering.discard(quiet.organization_phone_id)
        await eventually(lambda: bool(decisions(log, "deaf")), what="deaf once the confirmation window passed too")
        detected_after = asyncio.get_running_loop().time() - silenced_at
        headers = {"Authorization": "Bearer operator"}
        url = f"{served.base}/v1/sessions/{other.organization_phone_id}/probe"
        async with aiohttp.ClientSession() as http, http.post(url, headers=headers) as response:
            status, body = response.status, await response.json()
    (deaf,) = decisions(log, "deaf")
    assert deaf["organizationPhoneId"] == quiet.organization_phone_id
    assert deaf["detail"]["why"] == "silent past the confirmation window; its runtime cannot probe"
    assert deaf["detail"]["probeRoundTripMs"] is None
    # The silence began up to a report before `silenced_at`: a verdict from the refusal would come near the floor,
    # one from the confirmation window near floor + confirm. Half the window tells them apart without racing it.
    assert detected_after > slow.floor_seconds + slow.confirm_seconds / 2, "the refusal itself gave no verdict"
    assert fake.probes == [], "the runtime's probe handler is absent"
    assert status == 501 and "does not implement session.probe" in body["error"] and body["details"] == []


async def test_an_operator_probe_returns_the_runtime_round_trip(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001117788")
    config = sidecar_config(database, api_token="operator", liveness=FAST, liveness_tick=0.05)
    async with serving(config) as served, backend(served, {phone.organization_phone_id: phone.phone_jid}) as fake:
        url = f"{served.base}/v1/sessions/{phone.organization_phone_id}/probe"
        async with aiohttp.ClientSession() as http:
            async with http.post(url) as refused:
                assert refused.status == 401
            await eventually(lambda: served.components.link.owner_of(phone.organization_phone_id) is not None,
                             what="the runtime holds the session")  # fmt: skip
            async with http.post(url, headers={"Authorization": "Bearer operator"}) as response:
                assert response.status == 200
                assert await response.json() == {
                    "organizationPhoneId": phone.organization_phone_id, "ok": True, "roundTripMs": 4.5,
                }  # fmt: skip
    assert fake.probes == [phone.organization_phone_id]


def test_which_acks_say_unsupported() -> None:
    """The convention, read the same on this replica (link/server.py) and from another's (link/fleet_sockets.py)."""
    from sidecar.ports import SocketCommandUnsupported, command_failure

    refusals = ["unsupported: session.probe (no handler in this runtime)", "unknown command session.probe",
                "Unsupported: probe", "unsupported"]  # fmt: skip
    failures = ["Timed Out", "NotImplementedError: x", "the socket is closed; unsupported later", None, ""]
    assert all(isinstance(command_failure(text), SocketCommandUnsupported) for text in refusals)
    assert not any(isinstance(command_failure(text), SocketCommandUnsupported) for text in failures)
    assert str(command_failure(None)) == "runtime answered ok=false"
