"""--session-metrics through the real server, read with the stock Prometheus parser: `active` (the default) exports
exactly the sessions with something to say, for the window after they last had; `none` exports no per-session
family; `all` exports every tracked session. The fleet families are complete in every mode."""

from __future__ import annotations

import argparse
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Extras
from sidecar.client import connection_update, decrypt_error
from sidecar.config import ConfigError, add_config_arguments, config_from_args
from sidecar.telemetry.exported import SessionMetrics
from sidecar.telemetry.session_families import FAMILIES
from tests.integration.test_telemetry import post_events, scrape
from tests.monitoring import PROMTOOL, RULES, SCRAPE_JOB, run_tool
from tests.server import serving, sidecar_config

PER_SESSION = {name for name, _ in FAMILIES}
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
WINDOW = 600.0


def jid(phone: int) -> str:
    return f"7900000{phone:04d}@s.whatsapp.net"


def read(text: str) -> tuple[dict[str, set[str]], dict[str, float]]:
    """Per-session family -> the organization_phone_ids it has a sample for; fleet samples by name and labels."""
    phones: dict[str, set[str]] = {}
    fleet: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in PER_SESSION:
            phones[family.name] = {sample.labels["organization_phone_id"] for sample in family.samples}
        elif family.name in ("whatsapp_sidecar_sessions_exported", "whatsapp_sidecar_connected_sessions"):
            for sample in family.samples:
                fleet[sample.name + str(sorted(sample.labels.items()))] = sample.value
    return phones, fleet


async def test_active_exports_the_sessions_with_something_to_say_until_the_window_ends() -> None:
    now = [START]
    config = sidecar_config(None, session_metrics_window=WINDOW)  # the default mode: active
    async with serving(config, extras=Extras(clock=lambda: now[-1])) as served:
        await post_events(served, [connection_update(1, phone, jid(phone), "open") for phone in (1, 2, 3, 4)])
        phones, fleet = read(await scrape(served))
        assert phones == {name: set() for name in PER_SESSION}  # four open idle sessions: families, no samples
        assert fleet == {"whatsapp_sidecar_sessions_exported[]": 0.0,
                         "whatsapp_sidecar_connected_sessions[('organization_id', '1')]": 4.0}  # fmt: skip

        # a counted-only error on 1, two Bad MACs on 2 (unhealthy: one short of the limit of 3)
        await post_events(served, [decrypt_error(1, 1, jid(1), "No session record")])
        await post_events(served, [decrypt_error(1, 2, jid(2), "Bad MAC") for _ in range(2)])
        phones, fleet = read(await scrape(served))
        assert phones["whatsapp_session_connected"] == {"1", "2"}
        assert phones["whatsapp_session_last_error_timestamp_seconds"] == {"1", "2"}
        assert fleet["whatsapp_sidecar_sessions_exported[]"] == 2.0

        now.append(START + timedelta(seconds=WINDOW - 1))  # still within the window of 1's error
        phones, _ = read(await scrape(served))
        assert phones["whatsapp_session_healthy"] == {"1", "2"}

        now.append(START + timedelta(seconds=WINDOW + 1))  # 1 has nothing more to say; 2 is still unhealthy
        phones, fleet = read(await scrape(served))
        assert phones["whatsapp_session_healthy"] == {"2"}
        assert phones["whatsapp_session_bad_mac_errors"] == {"2"}
        assert fleet["whatsapp_sidecar_sessions_exported[]"] == 1.0
        assert fleet["whatsapp_sidecar_connected_sessions[('organization_id', '1')]"] == 4.0  # complete

        # an open resets 2's counters: its error is past the window, but it had something to say at the last
        # scrape, so its series stay for a window from then (no series vanishes the moment it goes quiet)
        await post_events(served, [connection_update(1, 2, jid(2), "open")])
        phones, _ = read(await scrape(served))
        assert phones["whatsapp_session_bad_mac_errors"] == {"2"}
        now.append(START + timedelta(seconds=2 * WINDOW + 2))
        phones, fleet = read(await scrape(served))
        assert phones["whatsapp_session_bad_mac_errors"] == set()
        assert fleet["whatsapp_sidecar_sessions_exported[]"] == 0.0


async def test_none_exports_no_per_session_family_and_all_every_session() -> None:
    for mode in (SessionMetrics.NONE, SessionMetrics.ALL):
        async with serving(sidecar_config(None, session_metrics=mode)) as served:
            await post_events(served, [connection_update(3, phone, jid(phone), "open") for phone in (5, 6, 7)])
            await post_events(served, [decrypt_error(3, 5, jid(5), "Bad MAC")])
            phones, fleet = read(await scrape(served))
            connected = fleet["whatsapp_sidecar_connected_sessions[('organization_id', '3')]"]
            assert connected == 3.0, mode
            if mode is SessionMetrics.NONE:
                assert phones == {}  # not even the families' HELP lines
                assert fleet["whatsapp_sidecar_sessions_exported[]"] == 0.0
            else:
                assert phones["whatsapp_session_connected"] == {"5", "6", "7"}
                assert phones["whatsapp_session_bad_mac_errors"] == {"5", "6", "7"}
                assert phones["whatsapp_session_last_error_timestamp_seconds"] == {"5"}
                assert fleet["whatsapp_sidecar_sessions_exported[]"] == 3.0


def test_a_bad_session_metrics_value_is_refused_by_name() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(ConfigError) as bad_mode:
        config_from_args(parser.parse_args(["--session-metrics", "some"]), env={})
    assert (bad_mode.value.key, bad_mode.value.problem) == (
        "session-metrics",
        "must be active, all or none, got 'some'",
    )
    with pytest.raises(ConfigError) as bad_window:
        config_from_args(parser.parse_args(["--session-metrics-window", "soon"]), env={})
    assert bad_window.value.key == "session-metrics-window"
    env = {"WA_SIDECAR_SESSION_METRICS": "none", "WA_SIDECAR_SESSION_METRICS_WINDOW": "30m"}
    config = config_from_args(parser.parse_args([]), env=env)
    assert (config.session_metrics, config.session_metrics_window) == (SessionMetrics.NONE, 1800.0)


async def test_the_per_session_alerts_select_the_sessions_active_mode_exports(tmp_path: Path) -> None:
    """promtool evaluates the shipped Bad MAC and unhealthy alert expressions over the series an `active` scrape
    gave (one session with 2 Bad MACs, one with a counted-only error, two idle): exactly the troubled session."""
    async with serving(sidecar_config(None)) as served:
        await post_events(served, [connection_update(1, phone, jid(phone), "open") for phone in (1, 2, 3, 4)])
        await post_events(served, [decrypt_error(1, 2, jid(2), "Bad MAC") for _ in range(2)])
        await post_events(served, [decrypt_error(1, 3, jid(3), "No session record")])
        text = await scrape(served)
    series = []
    for family in text_string_to_metric_families(text):
        if family.name in ("whatsapp_session_bad_mac_errors", "whatsapp_session_healthy"):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted({**sample.labels, "job": SCRAPE_JOB}.items()))
                series.append({"series": f"{sample.name}{{{labels}}}", "values": f"{sample.value:g}x10"})
    assert len(series) == 4  # phones 2 and 3, two families each
    rules = {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
             if "alert" in rule}  # fmt: skip
    expected_labels = {"job": SCRAPE_JOB, "organization_id": "1", "organization_phone_id": "2", "team": "unassigned"}
    cases = [
        {"expr": rules["WhatsAppSessionBadMacErrors"]["expr"], "eval_time": "3m",
         "exp_samples": [{"labels": "whatsapp_session_bad_mac_errors" + _labels(expected_labels), "value": 2}]},
        {"expr": rules["WhatsAppSessionUnhealthy"]["expr"], "eval_time": "3m",
         "exp_samples": [{"labels": "whatsapp_session_healthy" + _labels(expected_labels), "value": 0}]},
    ]  # fmt: skip
    test_file = tmp_path / "active.test.yml"
    test_file.write_text(yaml.safe_dump({"tests": [{"interval": "1m", "input_series": series,
                                                    "promql_expr_test": cases}]}))  # fmt: skip
    code, output = await run_tool(PROMTOOL, "test", "rules", str(test_file))
    assert code == 0, output


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


async def test_active_and_all_agree_on_every_step_of_a_random_fleet() -> None:
    """The registry keeps the connected counts and the sessions with something to say as sessions are written
    (no scan per scrape). Two servers get the same random opens, closes and errors, then a connected session is
    closed at the Bad MAC limit; after each step the `active` server's fleet family equals the per-organization
    sum of the `all` server's per-session connected series, and it exports exactly the sessions the `all` server
    shows an error for (the window is longer than the test)."""
    rng = random.Random(35)
    phones = {phone: 1 + phone % 3 for phone in range(1, 41)}
    steps: list[list[dict[str, object]]] = []
    for _ in range(12):
        events = []
        for phone in rng.sample(sorted(phones), 15):
            kind = rng.choice(("open", "open", "close", "Bad MAC", "No session record"))
            if kind in ("open", "close"):
                events.append(connection_update(phones[phone], phone, jid(phone), kind))
            else:
                events.append(decrypt_error(phones[phone], phone, jid(phone), kind))
        steps.append(events)
    steps.append([connection_update(1, 99, jid(99), "open"), *[decrypt_error(1, 99, jid(99), "Bad MAC")] * 3])
    async with (
        serving(sidecar_config(None)) as active,
        serving(sidecar_config(None, session_metrics=SessionMetrics.ALL)) as every,
    ):
        for step, events in enumerate(steps):
            for served in (active, every):
                await post_events(served, events)
                await served.components.runtime.settle()  # closes at the limit run in the background
            active_text, all_text = await scrape(active), await scrape(every)
            active_phones, active_fleet = read(active_text)
            all_phones, _ = read(all_text)
            connected: Counter[str] = Counter()
            for family in text_string_to_metric_families(all_text):
                if family.name == "whatsapp_session_connected":
                    connected.update(s.labels["organization_id"] for s in family.samples if s.value)
            fleet_connected = {key: value for key, value in active_fleet.items() if "connected" in key}
            assert fleet_connected == {
                f"whatsapp_sidecar_connected_sessions[('organization_id', '{org}')]": float(n)
                for org, n in connected.items()
            }, step
            said = all_phones["whatsapp_session_last_error_timestamp_seconds"]
            assert active_phones["whatsapp_session_connected"] == said, step
            assert active_fleet["whatsapp_sidecar_sessions_exported[]"] == len(said), step
        assert active.components.runtime.is_closed(99) and every.components.runtime.is_closed(99)
