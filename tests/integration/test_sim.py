"""The simulated fleet: real decryption failures, classified by the sidecar, healed by its commands; the demo."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.client import connection_update
from sidecar.rules.classification import ErrorClass, ErrorSource, classify
from sidecar.sim.crypto import AppStateKey, DecryptFailure, corrupt, desynchronize, new_session
from sidecar.sim.demo import add_demo_arguments
from sidecar.sim.simulated_fleet import FaultRates, FleetConfig, SimFleet
from tests.integration.test_restrictions import samples
from tests.server import serving, sidecar_config
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]


def test_a_desynchronized_session_fails_with_bad_mac_and_a_new_one_heals() -> None:
    sender, receiver = new_session()
    assert receiver.decrypt(sender.encrypt(b"hello")) == b"hello"
    desynchronize(receiver)
    with pytest.raises(DecryptFailure) as failure:
        receiver.decrypt(sender.encrypt(b"hello again"))
    assert str(failure.value) == "Bad MAC"
    assert classify(str(failure.value), ErrorSource.MESSAGE) is ErrorClass.BAD_MAC
    sender, receiver = new_session()
    assert receiver.decrypt(sender.encrypt(b"healed")) == b"healed"


def test_a_corrupted_app_state_key_fails_like_openssl_and_media_never_counts() -> None:
    server = AppStateKey()
    patch = server.encrypt(b'{"index":["mute"]}')
    assert server.decrypt(patch) == b'{"index":["mute"]}'
    texts = set()
    for _ in range(300):  # a wrong key fails the padding, or (rarely) passes it and fails the patch MAC
        with pytest.raises(DecryptFailure) as failure:
            corrupt(server).decrypt(server.encrypt(b'{"index":["mute"]}'))
        texts.add(str(failure.value))
        assert classify(str(failure.value), ErrorSource.APP_STATE) is ErrorClass.BAD_DECRYPT
        assert classify(str(failure.value), ErrorSource.MEDIA) is ErrorClass.MEDIA
    assert "error:1C800064:Provider routines::bad decrypt" in texts


async def test_the_sidecar_classifies_a_real_bad_mac_and_its_heal_really_heals() -> None:
    async with serving(sidecar_config(None)) as served:
        config = FleetConfig(sessions=1, peers=1, messages_per_second=10, patches_per_second=0, runtimes=1,
                             faults=FaultRates(bad_mac=1.0, bad_decrypt=0, flap=0), seed=3)  # fmt: skip
        fleet = SimFleet(served.ws_url, config)
        phone = next(iter(fleet.phones.values()))
        for client in fleet.clients:
            await client.start()
        try:
            await fleet.clients[0].send({"type": "connection.update", "organizationId": phone.organization_id,
                                         "organizationPhoneId": phone.phone_id, "phoneJid": phone.jid,
                                         "connection": "open"})  # fmt: skip
            await fleet.tick(0.0)  # one message, on a desynchronized session
            await fleet.clients[0].wait_acknowledged()  # applied (the sidecar's events.ack), not only written
            runtime = served.components.runtime
            await eventually(
                lambda: runtime.get_session_error_stats(phone.phone_id)["badMacErrors"] == 1, what="counted"
            )
            await eventually(
                lambda: fleet.stats.faults_healed == 1, what="the auth.clear reached the simulated runtime"
            )
            assert not phone.broken_peers
            fleet.config = replace(config, faults=FaultRates(bad_mac=0, bad_decrypt=0, flap=0))
            for moment in range(5):
                await fleet.tick(float(moment))
            await fleet.clients[0].flush()
            assert fleet.stats.messages == 6 and fleet.stats.errors_reported == 1, "healed: later messages decrypt"
        finally:
            for client in fleet.clients:
                await client.stop()


async def test_a_retry_recovers_a_transient_fault_and_a_broken_phone_loses_its_message() -> None:
    """Real crypto end to end: a desynchronized peer session fails, the sender answers the retry receipt with a new
    session and the message decrypts (message.recovered); a phone whose own keys are broken fails the re-send too,
    and the sidecar counts the message lost after --loss-deadline (read with the stock Prometheus parser)."""
    async with serving(sidecar_config(None, loss_deadline=1.0)) as served:
        config = FleetConfig(sessions=1, peers=1, messages_per_second=10, patches_per_second=0, runtimes=1,
                             faults=FaultRates(bad_mac=1.0, bad_decrypt=0, flap=0), seed=5, retry_answered=1.0,
                             retry_seconds=0.5)  # fmt: skip
        fleet = SimFleet(served.ws_url, config)
        phone = next(iter(fleet.phones.values()))
        client = fleet.clients[0]
        await client.start()
        try:
            await client.send(connection_update(*phone.ids, "open"))
            await fleet.tick(0.0)  # one message, on a desynchronized session: Bad MAC, a retry receipt
            fleet.config = replace(config, faults=FaultRates(bad_mac=0, bad_decrypt=0, flap=0))
            fleet.config = replace(fleet.config, messages_per_second=0)
            await fleet.tick(1.0)  # the sender's re-send, on a new session: decrypts
            assert (fleet.stats.messages_failed, fleet.stats.messages_recovered) == (1, 1)
            phone.broken = True
            fleet.config = replace(fleet.config, messages_per_second=10)
            await fleet.tick(2.0)
            fleet.config = replace(fleet.config, messages_per_second=0)
            await fleet.tick(3.0)  # the re-send fails too
            assert (fleet.stats.messages_failed, fleet.stats.messages_unrecovered) == (2, 1)
            await client.wait_acknowledged()

            async def lost() -> bool:
                return sum((await samples(served, "whatsapp_messages_lost_total")).values()) == 1.0

            await eventually(lost, what="the broken phone's message lost after the deadline")
            recovered = await samples(served, "whatsapp_messages_recovered_total")
            assert list(recovered.values()) == [1.0] and dict(next(iter(recovered)))["via"] == "retry"
            undecryptable = await samples(served, "whatsapp_messages_undecryptable_total")
            assert list(undecryptable.values()) == [2.0], "the failed re-send is the same message"
        finally:
            await client.stop()


async def test_the_demo_runs_and_shows_heals_and_closes() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "demo", "--listen", "127.0.0.1:0", "--sessions", "20", "--duration", "4",
        "--bad-mac-rate", "0.3", "--bad-decrypt-rate", "0.3", "--seed", "11",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, errors = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    assert process.returncode == 0, errors.decode()[-3000:]
    summary = text.split("\nsummary\n", 1)[1]
    heals = sum(
        int(n) for n in re.findall(r"(?:bad_mac|bad_decrypt) (\d+)", summary.split("heals", 1)[1].split("\n")[0])
    )
    closes = re.search(r"closes\s+bad_mac_limit (\d+)", summary)
    assert heals >= 1 and closes and int(closes.group(1)) >= 1, summary
    assert "/metrics" in text and "heal ratio" in summary
    messages = re.search(r"messages\s+(\d+) undecryptable, (\d+) recovered by retries, \d+ lost", summary)
    assert messages and int(messages.group(2)) >= 1, summary  # the senders' re-sends, with real crypto
    assert re.search(r"open \d+, reconnecting \d+, unhealthy \d+", summary), summary
    assert "unhealthy: one error short of a limit" in summary  # the view explains its terms
    pointed = re.findall(r"docs/[\w/.-]+\.md", summary.split("next steps", 1)[1])
    assert len(pointed) >= 4 and all((ROOT / page).is_file() for page in pointed), pointed  # where to go next


async def test_ctrl_c_stops_the_demo_cleanly_with_a_summary() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "demo", "--listen", "127.0.0.1:0", "--sessions", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 30)
    assert b"whatsapp-session-sidecar demo" in first, "the live view is drawn"
    process.send_signal(signal.SIGINT)
    rest, errors = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, errors.decode()[-2000:]
    assert b"\nsummary\n" in rest and b"heal ratio" in rest


async def test_the_fleet_s_deaf_sessions_are_found_and_restarted_and_its_idle_ones_never_flagged() -> None:
    """The simulated fleet at the demo's liveness scale: deaf sessions (nothing arrives, probes answered) are
    restarted and hear again; idle sessions (no traffic at all) are never probed; a flapped session comes back."""
    from sidecar.rules.liveness import DeafAction
    from sidecar.sim.demo import DEMO_LIVENESS

    fast = replace(DEMO_LIVENESS, floor_seconds=1.5, confirm_seconds=0.5, min_reports=3, min_history_seconds=0.5)
    config = sidecar_config(None, liveness=fast, liveness_tick=0.1, deaf_action=DeafAction.RESTART)
    async with serving(config) as served:
        faults = FaultRates(bad_mac=0, bad_decrypt=0, flap=0.005, deaf=0.0)
        fleet_config = FleetConfig(sessions=20, messages_per_second=5, faults=faults, idle_share=0.25, seed=7,
                                   activity_seconds=0.25)  # fmt: skip
        fleet = SimFleet(served.ws_url, fleet_config)
        stop = asyncio.Event()
        running = asyncio.create_task(fleet.run(stop=stop))
        try:
            await eventually(lambda: served.components.runtime.liveness.watched_count == 20, what="all watched")
            busy = [phone for phone in fleet.phones.values() if not phone.idle]
            await eventually(
                lambda: all(served.components.runtime.liveness.reports(p.phone_id) >= 4 for p in busy),
                what="baselines",
            )
            for phone in busy[:3]:  # three go deaf at once
                phone.deaf_since = time.monotonic()
                fleet.stats.deaf_injected += 1
            await eventually(lambda: fleet.stats.deaf_restarted == 3, what="the deaf sessions restarted")
            await eventually(lambda: served.components.runtime.liveness.deaf_count == 0, what="and recovered")
        finally:
            stop.set()
            await running
    assert fleet.stats.idle_flagged == 0
    assert all(1.5 < seconds < 10 for seconds in fleet.stats.detection_seconds), fleet.stats.detection_seconds
    connected = [s for s in served.components.runtime.sessions() if s.connected]
    assert fleet.stats.flaps > 0 and len(connected) >= 18, "flapped sessions come back (a few may be mid-flap)"


def test_the_demo_page_names_every_demo_option() -> None:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    options = [action.option_strings[0] for action in parser._actions if action.option_strings[0] != "-h"]
    page = (ROOT / "docs" / "demo.md").read_text()
    assert len(options) >= 9 and [o for o in options if f"`{o}`" not in page] == []
