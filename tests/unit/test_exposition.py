"""The fleet registry encoded in chunks (sidecar/telemetry/exposition.py) is byte for byte what prometheus_client's
own encoders give in one piece, in both formats, with families of many samples split across chunks; the stock
parsers read it back."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from sidecar.telemetry.exposition import EOF_LINE, SAMPLES_PER_CHUNK, encoded_in_chunks


def fleet_like(created: bool) -> CollectorRegistry:
    registry = CollectorRegistry()
    errors = Counter("demo_decrypt_errors", "by class", ["kind", "organization_id"], registry=registry)
    for org in range(SAMPLES_PER_CHUNK // 2 + 7):
        for kind in ("bad_mac", "no_session"):
            errors.labels(kind, str(org)).inc(org)
    latency = Histogram("demo_latency_seconds", 'with "quotes"\nand a newline', ["org"], registry=registry)
    for org in range(20):
        latency.labels(str(org)).observe(org / 10)
    Gauge("demo_small", "one sample", registry=registry).set(3)
    if not created:
        return registry
    counted = Counter("demo_regrouped", "its _created lines get a header of their own", ["n"], registry=registry)
    for n in range(SAMPLES_PER_CHUNK):
        counted.labels(str(n)).inc()
    return registry


async def chunks(registry: CollectorRegistry, encoder: object) -> list[bytes]:
    return [chunk async for chunk in encoded_in_chunks(registry, encoder)]  # type: ignore[arg-type]


@pytest.mark.parametrize("created", [False, True])
def test_chunks_join_to_the_stock_text_and_openmetrics_bodies(monkeypatch: pytest.MonkeyPatch, created: bool) -> None:
    monkeypatch.setattr("prometheus_client.metrics._use_created", created)
    registry = fleet_like(created)
    text_chunks = asyncio.run(chunks(registry, generate_latest))
    if not created:
        assert len(text_chunks) > 4  # the counter alone is split in three
    text = b"".join(text_chunks)
    assert text == generate_latest(registry)
    om = b"".join(asyncio.run(chunks(registry, openmetrics.generate_latest))) + EOF_LINE
    assert om == openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
    families = {family.name: len(family.samples) for family in parse_text(text.decode())}
    assert families["demo_decrypt_errors"] == 2 * (SAMPLES_PER_CHUNK // 2 + 7)
    read_back = {family.name for family in parse_openmetrics(om.decode())}  # type: ignore[no-untyped-call]
    assert read_back >= {"demo_decrypt_errors", "demo_latency_seconds"}
