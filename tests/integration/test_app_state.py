"""Baileys 7's app-state signals: golden lines produced by the real makeWASocket (integrations/baileys/test/
app-state.test.mjs, against the loopback stand-in), read by ingest-logs and counted by a real sidecar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sidecar.ingest.baileys_log import BaileysLogReader
from sidecar.rules.app_state import AppStateKind, app_state_signal
from sidecar.rules.classification import ErrorClass, ErrorSource, classify
from tests.conftest import FIXTURES
from tests.integration.test_ingest_logs import ingesting
from tests.waiting import eventually

GOLDEN = FIXTURES / "baileys" / "app_state_7.jsonl"
TOWARD_LIMIT = {AppStateKind.PATCH_MAC, AppStateKind.LTHASH_PATCH}


def golden() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]


def kind_of(label: str) -> AppStateKind:
    return AppStateKind(label.removeprefix("appstate7."))


def test_every_baileys_7_signal_was_produced() -> None:
    produced = {kind_of(entry["label"]) for entry in golden()}
    assert produced == set(AppStateKind) - {AppStateKind.DECRYPT}, "DECRYPT is Baileys 6.x (golden_lines.jsonl)"


def test_each_golden_line_becomes_one_app_state_event_of_its_kind() -> None:
    for entry in golden():
        reader = BaileysLogReader()
        events = reader.feed(json.dumps(entry["line"]) + "\n")
        assert len(events) == 1, entry["label"]
        event = events[0]
        assert event["source"] == "app-state" and event["collection"] == "regular_high"
        assert event["organizationPhoneId"] == entry["line"]["organizationPhoneId"]
        signal = app_state_signal(event["error"])
        assert signal is not None and signal.kind is kind_of(entry["label"]), entry["label"]
        expected = ErrorClass.BAD_DECRYPT if signal.kind in TOWARD_LIMIT else ErrorClass.APP_STATE_SYNC
        assert classify(event["error"], ErrorSource.APP_STATE) is expected
        # A message-source text is never read as app state.
        assert classify(event["error"], ErrorSource.MESSAGE) is not expected


def test_a_repeat_within_the_window_counts_once_per_kind() -> None:
    reader = BaileysLogReader()
    lines = {entry["label"]: json.dumps(entry["line"]) for entry in golden()}
    retry, gave_up = lines["appstate7.snapshot_retry"], lines["appstate7.gave_up"]
    events = reader.feed(f"{retry}\n{retry}\n{gave_up}\n")
    signals = [app_state_signal(event["error"]) for event in events]
    assert [signal.kind if signal else None for signal in signals] == [
        AppStateKind.SNAPSHOT_RETRY,
        AppStateKind.GAVE_UP,
    ]
    assert reader.stats.duplicates == 1


async def test_ingest_logs_counts_each_kind_and_only_two_toward_the_limit(tmp_path: Path) -> None:
    log = tmp_path / "backend.log"
    log.write_text("".join(json.dumps(entry["line"]) + "\n" for entry in golden()))
    async with ingesting(str(log), "--follow") as state:
        await eventually(lambda: state["base"] is not None, what="serving")
        base = state["base"]

        values: dict[str, float] = {}

        async def counted() -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as response:
                text = await response.text()
            values.clear()
            values.update(
                {
                    sample.labels["kind"]: sample.value
                    for family in text_string_to_metric_families(text)
                    if family.name == "whatsapp_app_state_sync_failures"
                    for sample in family.samples
                    if sample.name.endswith("_total") and sample.labels["collection"] == "regular_high"
                }
            )
            return sum(values.values()) == len(golden())

        await eventually(counted, what="every golden line counted")
        assert values == {str(kind): (0.0 if kind is AppStateKind.DECRYPT else 1.0) for kind in AppStateKind}
        async with aiohttp.ClientSession() as http:
            for entry in golden():
                phone = entry["line"]["organizationPhoneId"]
                async with http.get(f"{base}/v1/sessions/{phone}/stats") as response:
                    stats = await response.json()
                toward = kind_of(entry["label"]) in TOWARD_LIMIT
                assert stats["badDecryptErrors"] == (1 if toward else 0), entry["label"]
