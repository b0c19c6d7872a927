"""Deaf sessions: how fast the watch finds one, how often it is wrong, and what activity reporting costs.

    python -m bench.deaf [--runs 20] [--sessions 500] [--ingest-events 200000]

1. Detection: `--runs` runs of the simulated fleet (30 sessions, a fifth idle, real link, the sidecar in this
   process with the watch on the fleet's scale: floor 2 s, factor 4, confirm 1 s, 5 reports): one busy session
   goes deaf (nothing arrives, probes answered); seconds from then to the restart command, p50 and p99, against the
   configured bound (its threshold plus the confirmation plus one tick). Idle sessions probed: false positives.
2. False positives over simulated days: `--sessions` sessions with realistic traffic (support lines busy by day
   and sparse by night, small businesses with nights and lunch breaks off, bursty accounts, low-volume ones,
   idle ones), none deaf, driven through the pure policy with a 30 s report interval for three simulated days:
   deaf verdicts (all false) and probes per day, with the default thresholds and without the day of history.
3. Activity reporting's cost on the ingest benchmark (bench.ingest's stream, batches of 100, 4 connections,
   `wa-sidecar serve`): decrypt events/s with and without one activity event per 100 events interleaved (a fleet
   whose sessions each send 100 events per 30 s report interval: far more than real ones), medians of 3.
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime

from aiohttp import web

import bench.ingest as ingest
from bench.common import free_port, served_here
from sidecar.app import create_app
from sidecar.components import COMPONENTS
from sidecar.config import Config
from sidecar.rules.liveness import (
    Action,
    DeafAction,
    Liveness,
    LivenessConfig,
    on_activity,
    on_connection,
    on_tick,
    threshold,
)
from sidecar.sim.simulated_fleet import FaultRates, FleetConfig, SimFleet
from sidecar.telemetry.logs import configure_logging

FLEET_WATCH = LivenessConfig(
    floor_seconds=2.0, gap_factor=4.0, confirm_seconds=1.0, min_reports=5, min_history_seconds=2.0
)
TICK = 0.1


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def detection_run(seed: int) -> tuple[float, float, int]:
    """(seconds to the restart, the bound for this session, idle sessions flagged)."""
    config = Config(listen_host="127.0.0.1", listen_port=0, log_level="ERROR", liveness=FLEET_WATCH,
                    liveness_tick=TICK, deaf_action=DeafAction.RESTART)  # fmt: skip
    app = create_app(config)
    async with served_here(app) as port:
        return await _detect(app, f"ws://127.0.0.1:{port}/v1/runtime", seed)


async def _detect(app: web.Application, base: str, seed: int) -> tuple[float, float, int]:
    runtime = app[COMPONENTS].runtime
    faults = FaultRates(bad_mac=0, bad_decrypt=0, flap=0)
    fleet = SimFleet(base, FleetConfig(sessions=30, messages_per_second=5, patches_per_second=0.5, faults=faults,
                                       idle_share=0.2, seed=seed, activity_seconds=0.25))  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.create_task(fleet.run(stop=stop))
    try:
        busy = [phone for phone in fleet.phones.values() if not phone.idle]
        while not all(runtime.liveness.reports(phone.phone_id) >= 12 for phone in busy):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        chosen = random.Random(seed).choice(busy)
        state = runtime.liveness.state_of(chosen.phone_id)
        limit = threshold(state, FLEET_WATCH, time.time()) if state is not None else None
        bound = (limit or float("nan")) + FLEET_WATCH.confirm_seconds + TICK
        chosen.deaf_since = time.monotonic()
        fleet.stats.deaf_injected += 1
        while fleet.stats.deaf_restarted < 1:  # noqa: ASYNC110 - the fleet counts it; nothing to wait on
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await running
    return fleet.stats.detection_seconds[0], bound, fleet.stats.idle_flagged


# A simulated day ------------------------------------------------------------------------------------------

HOUR = 3600.0
DAY = 24 * HOUR


def traffic(kind: str, rng: random.Random, days: int) -> list[float]:
    """Inbound stanza times of one session over `days` days."""
    times: list[float] = []
    for day in range(days):
        start = day * DAY
        if kind == "support":  # busy by day, sparse by night
            times += _poisson(rng, start + 8 * HOUR, start + 20 * HOUR, 20.0)
            times += _poisson(rng, start + 20 * HOUR, start + 32 * HOUR, 15 * 60.0)
        elif kind == "business":  # office hours, lunch off, nights off
            times += _poisson(rng, start + 9 * HOUR, start + 12 * HOUR, 240.0)
            times += _poisson(rng, start + 13 * HOUR, start + 18 * HOUR, 240.0)
        elif kind == "bursty":  # a burst every couple of hours, nothing between
            moment = start + rng.uniform(0, 2 * HOUR)
            while moment < start + DAY:
                times += [moment + 5.0 * k for k in range(rng.randint(5, 30))]
                moment += rng.expovariate(1 / (2 * HOUR))
        elif kind == "low":  # a few an hour, all day
            times += _poisson(rng, start, start + DAY, 45 * 60.0)
    return sorted(t for t in times if t < days * DAY)


def _poisson(rng: random.Random, start: float, end: float, mean_gap: float) -> list[float]:
    out, moment = [], start
    while (moment := moment + rng.expovariate(1 / mean_gap)) < end:
        out.append(moment)
    return out


def simulated_days(sessions: int, seed: int, config: LivenessConfig, days: int = 3) -> dict[str, list[int]]:
    """Deaf verdicts and probes per simulated day (none of the sessions is deaf: every verdict is a false one)."""
    rng = random.Random(seed)
    kinds = rng.choices(["support", "business", "bursty", "low", "idle"], weights=[30, 30, 20, 10, 10], k=sessions)
    verdicts = {"deaf": [0] * days, "probes": [0] * days}
    report_every = 30.0
    for kind in kinds:
        stanzas = traffic(kind, rng, days) if kind != "idle" else []
        state = on_connection(Liveness(), 0.0, True)
        index, now = 0, report_every
        while now <= days * DAY:
            last = None
            while index < len(stanzas) and stanzas[index] <= now:
                last = stanzas[index]
                index += 1
            if last is not None:
                state, _ = on_activity(state, last, config)
            state, action = on_tick(state, now, config)
            day = min(days - 1, int(now // DAY))
            if action is Action.PROBE:
                verdicts["probes"][day] += 1
                state = state._replace(probing=False, probe_ok_at=now)  # the probe answers: not deaf
            elif action is Action.DEAF:
                verdicts["deaf"][day] += 1
            now += report_every
    return verdicts


# Activity's cost on the ingest benchmark -----------------------------------------------------------------


def activity_event(phone: int) -> dict[str, object]:
    return {"type": "activity", "organizationId": 1 + phone % 20, "organizationPhoneId": phone,
            "phoneJid": f"7900{phone:07d}@s.whatsapp.net", "messages": 100, "receipts": 20, "notifications": 1,
            "lastInboundAt": datetime.now(UTC).isoformat()}  # fmt: skip


def frames_with_activity(total: int, batch: int, connection: int, connections: int, seq: bool = False) -> list[str]:
    """bench.ingest's stream with one activity event after every 100 events (not counted as ingest events);
    without sequence numbers (`seq` is bench.ingest's, unused here)."""
    events: list[dict[str, object]] = []
    share = ingest.SESSIONS // connections
    for index in range(total):
        phone = 1 + connection * share + index % share
        events.append(ingest.event(phone))
        if index % 100 == 99:
            events.append(activity_event(phone))
    return [json.dumps(events[start : start + batch]) for start in range(0, len(events), batch)]


async def activity_cost(events: int, runs: int) -> tuple[float, float]:
    port = free_port()
    argv = [sys.executable, "-m", "sidecar", "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "ERROR"]
    plain, mixed = [], []
    async with ingest.server(argv, port) as base:
        for _ in range(runs):
            plain.append(await ingest.throughput(base, True, 4, events, 100))
            mixed.append(await ingest.throughput(base, True, 4, events, 100, build=frames_with_activity))
    return statistics.median(plain), statistics.median(mixed)


async def main_async(args: argparse.Namespace) -> None:
    configure_logging("ERROR")
    results = [await detection_run(seed) for seed in range(args.runs)]
    seconds = [r[0] for r in results]
    ratios = [r[0] / r[1] for r in results]
    watch = FLEET_WATCH
    print(f"deaf: detection over {args.runs} runs of the simulated fleet (floor {watch.floor_seconds:g} s, "
          f"factor {watch.gap_factor:g}, confirm {watch.confirm_seconds:g} s, tick {TICK:g} s)")  # fmt: skip
    print(f"  seconds to the restart: p50 {statistics.median(seconds):.2f}  p99 {percentile(seconds, 0.99):.2f}  "
          f"max {max(seconds):.2f}")  # fmt: skip
    print(f"  against each session's bound (threshold + confirm + tick): p50 {statistics.median(ratios):.2f}  "
          f"max {max(ratios):.2f}; idle sessions flagged: {sum(r[2] for r in results)}")  # fmt: skip
    variants = (("defaults", LivenessConfig()), ("--deaf-min-history 0", LivenessConfig(min_history_seconds=0)))
    for name, config in variants:
        days = simulated_days(args.sessions, 1, config)
        print(f"  3 simulated days of {args.sessions} sessions, none deaf, {name}: deaf verdicts per day "
              f"{days['deaf']} (probes {days['probes']})")  # fmt: skip
    plain, mixed = await activity_cost(args.ingest_events, 3)
    print(f"  ingest (batches of 100, 4 connections): {plain:,.0f} events/s; with 1 activity per 100 events "
          f"{mixed:,.0f} events/s: ratio {mixed / plain:.3f} (cost {100 * (1 - mixed / plain):.1f}%)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--ingest-events", type=int, default=200_000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
