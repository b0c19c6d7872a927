"""Benchmarks run in a tiny smoke mode so they cannot rot (their figures are not asserted)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.monitoring import killed_on_exit

ROOT = Path(__file__).resolve().parents[2]


async def bench(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    async with killed_on_exit(process):  # a hung benchmark and the sidecar it started die with the test
        output, errors = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, errors.decode()[-3000:]
    return output.decode()


async def test_scrape_benchmark_runs() -> None:
    output = await bench("bench/scrape.py", "--sizes", "50", "--runs", "1", "--active-share", "0.1")
    mode, header, row = output.splitlines()[:3]
    assert mode == "--session-metrics active, active share 0.1"
    assert header.split()[:2] == ["sessions", "exported"] and row.split()[:2] == ["50", "5"]


async def test_storm_benchmark_runs() -> None:
    output = await bench("-m", "bench.storm", "--sessions", "20", "--errors", "10", "--connections", "2")
    assert "session.end exactly once each: True" in output and "keys left: 0" in output


async def test_storm_benchmark_compares_replica_counts() -> None:
    output = await bench(
        "-m", "bench.storm", "--sessions", "20", "--errors", "10", "--replicas", "1,2", "--poolers", "none,transaction"
    )  # fmt: skip
    assert output.count("session.end exactly once each: True") == 4 and "2 replicas:" in output, output
    assert "1 replica(s) through PgBouncer (transaction):" in output, output


async def test_fleet_latency_benchmark_runs() -> None:
    output = await bench(
        "-m", "bench.fleet_latency", "--seconds", "2", "--rate", "100", "--probes-per-second", "20",
        "--locked-rows", "1",
    )  # fmt: skip
    assert "event -> decision" in output and "p99" in output and "rows held:" in output, output


async def test_leak_benchmark_runs() -> None:
    output = await bench("-m", "bench.leak", "--phones", "20", "--cycles", "60", "--warmup", "20")
    assert "growth" in output


async def test_notify_latency_benchmark_runs() -> None:
    output = await bench("-m", "bench.notify_latency", "--sessions", "5", "--rate", "50")
    assert "direct webhook: 5 arrived" in output and "forged signatures seen: 0" in output
    assert "prometheus+alertmanager: 5 arrived" in output


async def test_ingest_logs_benchmark_runs() -> None:
    output = await bench("-m", "bench.ingest_logs", "--lines", "3000", "--sessions", "20", "--runs", "1")
    assert "ingest-logs:" in output and "mtail:" in output
    truth = re.search(r"ground truth: (\d+) real Bad MACs", output)
    counted = re.search(r"counted: ingest-logs bad_mac (\d+)", output)
    assert truth and counted and truth.group(1) == counted.group(1), output


@pytest.mark.parametrize("mix", ["counted", "reconnect"])
async def test_ingest_benchmark_runs(mix: str) -> None:
    output = await bench(
        "-m", "bench.ingest", "--connections", "2", "--events", "2000", "--rate", "2000", "--runs", "1", "--mix", mix
    )  # fmt: skip
    assert f"the {mix} mix" in output and "one event per frame: sidecar" in output, output
    assert "event -> decision -> command" in output, output


async def test_memory_benchmark_runs() -> None:
    output = await bench("-m", "bench.memory", "--sizes", "500")
    assert "bytes per session" in output


async def test_close_latency_benchmark_runs() -> None:
    output = await bench("-m", "bench.close_latency", "--phones", "50", "--keys", "20", "--closes", "5")
    assert "5 closes: p50" in output and "auth rows left 900 (expected 900)" in output, output


async def test_leak_benchmark_runs_on_the_embedded_store() -> None:
    output = await bench("-m", "bench.leak", "--embedded", "--phones", "20", "--cycles", "60", "--warmup", "20")
    assert "(embedded store)" in output and "growth" in output


async def test_durable_lag_benchmark_runs() -> None:
    output = await bench("-m", "bench.durable_lag", "--senders", "4", "--seconds", "1", "--phones", "50")
    assert "events accepted by 4 HTTP senders" in output and "p99" in output


async def test_scale_benchmark_runs() -> None:
    output = await bench(
        "-m", "bench.scale", "--sessions", "200", "--replicas", "2", "--idle-seconds", "4", "--storm-phones", "20"
    )  # fmt: skip
    assert "0 closed twice" in output and "0 commands delivered twice" in output, output
    assert "median of 3 rounds" in output and "cores busy" in output, output
    assert re.search(r"schema\s+[\d,]+ bytes per open idle session", output), output


async def test_policies_benchmark_runs() -> None:
    output = await bench("-m", "bench.policies", "--sessions", "60", "--days", "3", "--rates", "0.005")
    rows = [line.split() for line in output.splitlines() if line.split()[:1] == ["0.005"]]
    assert [row[1] for row in rows] == ["counters", "windowed", "loss-aware"], output
    assert "fewer logouts" in output
    crypto = re.search(r"crypto: (\d+) messages failed MAC verification \((\d+) re-sends decrypted", output)
    assert crypto and int(crypto.group(1)) > 0 and int(crypto.group(2)) > 0, output  # real ciphertext, both ways
