"""Scrape time of /metrics with N live sessions, side by side with stock prometheus-client gauges.

    python bench/scrape.py [--sizes 1000,10000,50000] [--runs 5] [--session-metrics active|all|none]
                           [--active-share 0.01]

For each size it builds N open sessions in a real SessionRuntime (embedded store), a share of them with a Bad MAC
(`--active-share`: the sessions `--session-metrics active` exports), then times, over several runs:
- sidecar: a real HTTP GET /metrics (curl, another process) against the app served on loopback: wall time,
  the event loop thread's CPU time per scrape, and the longest stretch the event loop was blocked while
  scraping (measured by a 1 ms ticker);
- stock: prometheus_client Gauges holding five per-session series for as many sessions as the sidecar exported
  (every one with `all`), rendered with generate_latest in the same process (wall and CPU; it runs on the event
  loop in one piece, so its block equals its time).
Medians are printed. This is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import replace

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from sidecar.app import Extras, create_app
from sidecar.components import COMPONENTS
from sidecar.config import Config
from sidecar.events.schema import ConnectionUpdate
from sidecar.telemetry.exported import SessionMetrics


class LoopBlockMeter:
    """The longest gap between 1 ms ticks: how long the loop could not run anything else."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.001)
            last = now

    def __enter__(self) -> LoopBlockMeter:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


def stock_registry(size: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    labels = ["organization_id", "organization_phone_id", "team"]
    gauges = [
        Gauge(name, "stock", labels, registry=registry)
        for name in (
            "whatsapp_session_bad_mac_errors",
            "whatsapp_session_bad_decrypt_errors",
            "whatsapp_session_healthy",
            "whatsapp_session_connected",
            "whatsapp_session_last_error_timestamp_seconds",
        )
    ]
    for phone in range(1, size + 1):
        for gauge in gauges:
            gauge.labels(str(1 + phone % 50), str(phone), "unassigned").set(1)
    return registry


async def measure(size: int, runs: int, mode: SessionMetrics, share: float) -> dict[str, float]:
    app = create_app(replace(Config(), listen_port=0, session_metrics=mode), Extras())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    runtime = app[COMPONENTS].runtime
    every = max(1, round(1 / share)) if share > 0 else size + 1
    for phone in range(1, size + 1):
        jid = f"7{phone:011d}@s.whatsapp.net"
        await runtime.apply(
            ConnectionUpdate(
                organization_id=1 + phone % 50, organization_phone_id=phone, phone_jid=jid, connection="open"
            )
        )
        if phone % every == 0:
            await runtime.handle_bad_mac_error(1 + phone % 50, phone, jid)
    await runtime.settle()
    exported = {SessionMetrics.ALL: size, SessionMetrics.ACTIVE: size // every, SessionMetrics.NONE: 0}[mode]
    wall, cpu, block, size_bytes = [], [], [], 0
    for _ in range(runs):
        # The client is another process (curl), so only the server's work runs on (and can block) this loop.
        # Spawning it blocks the loop too, so the meter starts once it runs.
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", url, stdout=asyncio.subprocess.PIPE
        )
        with LoopBlockMeter() as meter:
            cpu_start, start = time.thread_time(), time.perf_counter()
            output, _ = await curl.communicate()
            wall.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - cpu_start)  # CPU of the event loop's thread: the server's share
        if curl.returncode != 0:
            raise RuntimeError(f"curl {url} failed with {curl.returncode}")
        size_bytes = int(output)
        block.append(meter.longest)
    await runner.cleanup()
    registry = stock_registry(exported)
    stock_wall, stock_cpu = [], []
    for _ in range(runs):
        cpu_start, start = time.process_time(), time.perf_counter()
        stock_body = generate_latest(registry)
        stock_wall.append(time.perf_counter() - start)
        stock_cpu.append(time.process_time() - cpu_start)
    return {
        "sessions": size,
        "exported": exported,
        "sidecar_ms": statistics.median(wall) * 1000,
        "sidecar_cpu_ms": statistics.median(cpu) * 1000,
        "sidecar_block_ms": statistics.median(block) * 1000,
        "sidecar_mb": size_bytes / 1e6,
        "stock_ms": statistics.median(stock_wall) * 1000,
        "stock_cpu_ms": statistics.median(stock_cpu) * 1000,
        "stock_mb": len(stock_body) / 1e6,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--session-metrics", choices=[str(m) for m in SessionMetrics], default="active")
    parser.add_argument("--active-share", type=float, default=0.01, help="sessions with a Bad MAC (0.01: 1 in 100)")
    args = parser.parse_args()
    mode = SessionMetrics(args.session_metrics)
    print(f"--session-metrics {mode}, active share {args.active_share}")
    print(
        f"{'sessions':>8}  {'exported':>8}  {'sidecar ms':>10}  {'cpu ms':>7}  {'max block ms':>12}  {'MB':>5}  "
        f"{'stock ms':>9}  {'cpu ms':>7}  {'MB':>5}  {'speed-up':>8}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        r = await measure(size, args.runs, mode, args.active_share)
        print(
            f"{r['sessions']:>8}  {r['exported']:>8}  {r['sidecar_ms']:>10.1f}  {r['sidecar_cpu_ms']:>7.1f}  "
            f"{r['sidecar_block_ms']:>12.1f}  "
            f"{r['sidecar_mb']:>5.1f}  {r['stock_ms']:>9.1f}  {r['stock_cpu_ms']:>7.1f}  {r['stock_mb']:>5.1f}  "
            f"{r['stock_ms'] / r['sidecar_ms']:>7.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
