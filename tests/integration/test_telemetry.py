"""Prometheus metrics and OpenTelemetry spans, driven through the real app and runtime."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from asyncio.subprocess import PIPE, STDOUT

import aiohttp
import asyncpg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Extras
from sidecar.client import connection_update, decrypt_error
from sidecar.runtime.errors import CloseIncomplete
from sidecar.telemetry.exported import SessionMetrics
from sidecar.telemetry.logs import json_handler
from sidecar.telemetry.tracing import tracing_from_provider
from tests.seed import add_phone, refuse_key_deletes
from tests.server import Served, serving, sidecar_config

JID = "79001112233@s.whatsapp.net"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


async def scrape(served: Served, accept: str | None = None) -> str:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as http, http.get(served.base + "/metrics", headers=headers) as response:
        assert response.status == 200
        return await response.text()


def session_value(text: str, name: str, phone_id: int) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("organization_phone_id") == str(phone_id):
                return sample.value
    return None


async def post_events(served: Served, events: list[dict[str, object]]) -> None:
    async with aiohttp.ClientSession() as http, http.post(served.base + "/v1/events", json=events) as response:
        assert response.status == 202, await response.text()


async def test_bad_mac_gauges_then_series_gone_and_a_close_counted(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 7, "79001112233")
    pid = phone.organization_phone_id
    registry = CollectorRegistry()
    # every session's series (an open idle session has none under the default `active`: tests/integration/
    # test_session_metrics.py)
    config = sidecar_config(database, organization_teams={7: "sales"}, session_metrics=SessionMetrics.ALL)
    async with serving(config, extras=Extras(registry=registry)) as served:
        closes = ("whatsapp_session_closes_total", {"reason": "bad_mac_limit", "organization_id": "7"})
        await post_events(served, [connection_update(7, pid, JID, "open")])
        text = await scrape(served)
        assert session_value(text, "whatsapp_session_connected", pid) == 1
        assert session_value(text, "whatsapp_session_bad_mac_errors", pid) == 0
        assert registry.get_sample_value(*closes) == 0  # initialised when the organization was first seen
        for expected in (1, 2):
            await post_events(served, [decrypt_error(7, pid, JID, "Bad MAC")])
            text = await scrape(served)
            assert session_value(text, "whatsapp_session_bad_mac_errors", pid) == expected
            assert session_value(text, "whatsapp_session_healthy", pid) == (1 if expected < 2 else 0)
        assert 'team="sales"' in text
        team_info = ("whatsapp_organization_team_info", {"organization_id": "7", "team": "sales"})
        assert registry.get_sample_value(*team_info) == 1
        assert session_value(text, "whatsapp_session_last_error_timestamp_seconds", pid) is not None
        await post_events(served, [decrypt_error(7, pid, JID, "Bad MAC")])
        await served.components.runtime.settle()
        text = await scrape(served)
        assert f'organization_phone_id="{pid}"' not in text
        assert registry.get_sample_value(*closes) == 1
        assert (
            registry.get_sample_value("whatsapp_decrypt_errors_total", {"kind": "bad_mac", "organization_id": "7"}) == 3
        )
        # Two heals were decided. The second ran on its own (2 + 0), or was merged into a queued round that then
        # ran (2 + 1) or that the close superseded (1 + 1).
        heals = registry.get_sample_value("whatsapp_session_heals_total", {"kind": "bad_mac"}) or 0
        merged = registry.get_sample_value("whatsapp_session_heals_coalesced_total", {"kind": "bad_mac"}) or 0
        assert (heals, merged) in {(2, 0), (2, 1), (1, 1)}
        assert (registry.get_sample_value("whatsapp_auth_keys_deleted_total", {"scope": "all"}) or 0) > 0
        assert registry.get_sample_value("whatsapp_session_close_duration_seconds_count") == 1
        assert (
            registry.get_sample_value("whatsapp_sidecar_events_total", {"type": "decrypt.error", "channel": "http"})
            == 3
        )
        assert registry.get_sample_value("whatsapp_session_error_limit", {"kind": "bad_mac"}) == 3
        assert registry.get_sample_value("whatsapp_session_error_limit", {"kind": "bad_decrypt"}) == 5
        assert registry.get_sample_value("whatsapp_sidecar_sessions", {"state": "closed"}) == 1
        async with aiohttp.ClientSession() as http:
            await http.post(served.base + "/v1/events", data="{")
            await http.post(served.base + "/v1/events", json={"type": "nope"})
        assert registry.get_sample_value("whatsapp_sidecar_events_rejected_total", {"reason": "malformed"}) == 1
        assert registry.get_sample_value("whatsapp_sidecar_events_rejected_total", {"reason": "invalid"}) == 1
    assert JID.split("@")[0] not in text  # phone numbers never appear in metrics


async def test_known_label_values_start_at_zero(database: str) -> None:
    registry = CollectorRegistry()
    async with serving(sidecar_config(database), extras=Extras(registry=registry)):
        for scope in ("app_state_sync", "peer_session", "all"):
            assert registry.get_sample_value("whatsapp_auth_keys_deleted_total", {"scope": scope}) == 0
        for kind in ("bad_mac", "bad_decrypt"):
            assert registry.get_sample_value("whatsapp_session_heals_total", {"kind": kind}) == 0
        assert registry.get_sample_value("whatsapp_sidecar_runtime_connections") == 0
        assert (
            registry.get_sample_value("whatsapp_sidecar_build_info", {"version": __import__("sidecar").__version__})
            == 1
        )


async def test_metrics_pass_promtool_and_both_parsers(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid = phone.organization_phone_id
    provider = TracerProvider()
    async with serving(sidecar_config(database), extras=Extras(tracing=tracing_from_provider(provider))) as served:
        await post_events(served, [connection_update(1, pid, JID, "open"), decrypt_error(1, pid, JID, "Bad MAC")])
        await post_events(served, [connection_update(1, 999, "79009999999@s.whatsapp.net", "open")])
        await served.components.runtime.force_close_session(999, "Maintenance restart")
        text = await scrape(served)
        openmetrics = await scrape(served, OPENMETRICS)
    promtool = await asyncio.create_subprocess_exec(
        "promtool", "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await asyncio.wait_for(promtool.communicate(text.encode()), 60)
    assert promtool.returncode == 0, output.decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"whatsapp_session_bad_mac_errors", "whatsapp_session_closes", "whatsapp_sidecar_build_info"} <= names
    families = {family.name: family for family in parse_openmetrics(openmetrics)}  # type: ignore[no-untyped-call]
    assert openmetrics.rstrip().endswith("# EOF")
    buckets = [s for s in families["whatsapp_session_close_duration_seconds"].samples if s.exemplar is not None]
    assert buckets and len(buckets[0].exemplar.labels["trace_id"]) == 32


async def test_cardinality_ten_thousand_sessions_leave_no_series() -> None:
    async with serving(sidecar_config(None, session_metrics=SessionMetrics.ALL)) as served:
        runtime = served.components.runtime
        for start in range(1, 10_001, 1000):
            await post_events(
                served,
                [connection_update(1, i, f"7900{i:07d}@s.whatsapp.net", "open") for i in range(start, start + 1000)],
            )
        text = await scrape(served)
        assert text.count("whatsapp_session_connected{") == 10_000
        await asyncio.gather(*(runtime.force_close_session(i, "rotation") for i in range(1, 10_001)))
        text = await scrape(served)
        assert "whatsapp_session_connected{" not in text
        assert served.components.families.cached_labels == 0
        assert runtime.session_count == 0 and runtime.background_tasks == 0


def spans_by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


async def test_spans_names_attributes_parents_and_errors(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid = phone.organization_phone_id
    await refuse_key_deletes(db)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with serving(sidecar_config(database), extras=Extras(tracing=tracing_from_provider(provider))) as served:
        await post_events(served, [connection_update(1, pid, JID, "open")])
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        event = {
            **decrypt_error(1, pid, JID, "Bad MAC", peer_jid="15550002222@s.whatsapp.net"),
            "traceparent": traceparent,
        }
        await post_events(served, [event])
        await served.components.runtime.settle()
        with pytest.raises(CloseIncomplete):  # the trigger refuses the key deletion: not reported as done
            await served.components.runtime.force_close_session(pid, "Maintenance restart")
    spans = spans_by_name(exporter)
    [decrypt] = spans["session.decrypt_error"]
    assert format(decrypt.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert decrypt.parent is not None and format(decrypt.parent.span_id, "016x") == "b7ad6b7169203331"
    assert decrypt.attributes is not None
    assert decrypt.attributes["whatsapp.organization_phone_id"] == pid
    assert decrypt.attributes["whatsapp.error.class"] == "bad_mac"
    assert decrypt.attributes["whatsapp.counter.after"] == 1
    [heal] = spans["session.heal"]
    assert heal.parent is not None and heal.parent.span_id == decrypt.context.span_id
    assert heal.status.status_code is StatusCode.ERROR  # the trigger refuses the key deletion
    [force] = spans["session.force_close"]
    [close] = spans["session.close"]
    assert close.parent is not None and close.parent.span_id == force.context.span_id
    assert close.attributes is not None and close.attributes["whatsapp.close.reason"] == "forced"
    children = {
        name: spans[name][0]
        for name in ("runtime.end_socket", "auth.delete_keys", "phone.mark_logged_out", "closure.record")
    }
    for child in children.values():
        assert child.parent is not None and child.parent.span_id == close.context.span_id
        assert child.end_time is not None and child.start_time is not None and child.end_time >= child.start_time
    assert children["auth.delete_keys"].status.status_code is StatusCode.ERROR
    assert children["auth.delete_keys"].attributes == {"error.type": "RaiseError"}
    assert children["runtime.end_socket"].status.status_code is StatusCode.ERROR  # no runtime owns the session
    assert children["phone.mark_logged_out"].status.status_code is StatusCode.UNSET


async def test_log_lines_inside_a_span_carry_its_trace_and_span_ids(database: str, db: asyncpg.Connection) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid = phone.organization_phone_id
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stream = io.StringIO()
    handler = json_handler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        async with serving(sidecar_config(database), extras=Extras(tracing=tracing_from_provider(provider))) as served:
            await post_events(served, [connection_update(1, pid, JID, "open")])
            await served.components.runtime.force_close_session(pid, "Maintenance restart")
            await served.components.runtime.settle()
    finally:
        root.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    [closed] = [line for line in lines if line["msg"] == "session closed"]
    spans = spans_by_name(exporter)
    [close] = spans["session.close"]
    assert closed["trace_id"] == format(close.context.trace_id, "032x")
    # The line was written inside one of the close's spans (the close itself or one of its steps).
    close_family = {close.context.span_id} | {
        span.context.span_id for group in spans.values() for span in group if span.parent == close.context
    }
    assert int(closed["span_id"], 16) in close_family
    [loaded] = [line for line in lines if line["msg"].startswith("loaded ")]  # the restore: outside any span
    assert "trace_id" not in loaded
