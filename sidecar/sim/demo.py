"""`wa-sidecar demo`: the sidecar and a simulated fleet in one process on loopback, with a live terminal view."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from prometheus_client import CollectorRegistry

from sidecar.components import Components
from sidecar.config import Config
from sidecar.rules.liveness import DeafAction, LivenessConfig
from sidecar.rules.loss import DEFAULT_DEADLINE_SECONDS
from sidecar.rules.policy import ErrorStats
from sidecar.rules.records import ClosureRecord, PhoneRef, RecordDecision
from sidecar.runtime.observer import RuntimeObserver
from sidecar.sim.simulated_fleet import FaultRates, FleetConfig, FleetStats, SimFleet

REFRESH_SECONDS = 1.0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--sessions", type=_number(int, "sessions", 1, 1_000_000), default=50, help="simulated phones (50)")
    add("--duration", type=_number(float, "duration", 0.1, 1e9), help="seconds (default: until Ctrl-C)")
    add("--bad-mac-rate", type=_number(float, "bad-mac-rate", 0, 1), default=0.01,
        help="chance a message finds its peer session desynchronized (0.01)")  # fmt: skip
    add("--bad-decrypt-rate", type=_number(float, "bad-decrypt-rate", 0, 1), default=0.05,
        help="chance an app-state sync finds its cached key corrupted (0.05)")  # fmt: skip
    add("--flap-rate", type=_number(float, "flap-rate", 0, 1), default=0.001,
        help="chance per session and tick of a network flap (0.001)")  # fmt: skip
    add("--rescan-seconds", type=_number(float, "rescan-seconds", 0.1, 1e6), default=3.0,
        help="a logged-out phone comes back after a QR re-scan this long after (3)")  # fmt: skip
    add("--deaf-rate", type=_number(float, "deaf-rate", 0, 1), default=0.00005,
        help="chance per session and tick of going deaf: nothing arrives, pings still answered (0.00005)")  # fmt: skip
    add("--broken-rate", type=_number(float, "broken-rate", 0, 1), default=0.00002,
        help="chance per session and tick that a phone's own keys break: its messages are lost until it is logged "
        "out (0.00002)")  # fmt: skip
    add("--idle-share", type=_number(float, "idle-share", 0, 1), default=0.1,
        help="share of sessions that receive nothing at all and must never be flagged (0.1)")  # fmt: skip
    add("--seed", type=int, help="random seed for a repeatable fleet")


def fleet_config(args: argparse.Namespace) -> FleetConfig:
    faults = FaultRates(
        bad_mac=args.bad_mac_rate, bad_decrypt=args.bad_decrypt_rate, flap=args.flap_rate, deaf=args.deaf_rate,
        broken=args.broken_rate,
    )  # fmt: skip
    return FleetConfig(
        sessions=args.sessions, faults=faults, rescan_seconds=args.rescan_seconds, seed=args.seed,
        idle_share=args.idle_share,
    )  # fmt: skip


# The simulated fleet lives in seconds, not hours: a watch on its scale (unless liveness flags were given).
DEMO_LIVENESS = LivenessConfig(
    floor_seconds=4.0, gap_factor=4.0, confirm_seconds=2.0, min_reports=5, min_history_seconds=3.0
)


DEMO_LOSS_DEADLINE = 5.0  # the simulated senders re-send within a second


def demo_config(config: Config) -> Config:
    if config.loss_deadline == DEFAULT_DEADLINE_SECONDS:
        config = replace(config, loss_deadline=DEMO_LOSS_DEADLINE)
    if config.liveness != LivenessConfig():
        return config
    return replace(config, liveness=DEMO_LIVENESS, liveness_tick=0.5, deaf_action=DeafAction.RESTART)


def _number(kind: Callable[[str], float], name: str, low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {raw!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be from {low:g} to {high:g}, got {raw!r}")
        return value

    return parse


class DemoTally(RuntimeObserver):
    """What the view shows besides the metrics: health flips (the owner notifications a team would get)."""

    def __init__(self) -> None:
        self.notifications: Counter[str] = Counter()
        self.liveness: Counter[str] = Counter()

    def health_changed(self, phone: PhoneRef, stats: ErrorStats) -> None:
        self.notifications["session.recovered" if stats["isHealthy"] else "session.unhealthy"] += 1

    def closed(self, record: ClosureRecord) -> None:
        self.notifications["session.closed"] += 1

    def decided(self, decision: RecordDecision) -> None:
        if decision.decision in ("deaf", "session.restarted", "session.deaf_recovered", "session.restart_held"):
            self.liveness[decision.decision] += 1


def _totals(registry: CollectorRegistry, family: str, label: str) -> Counter[str]:
    totals: Counter[str] = Counter()
    for metric in registry.collect():
        if metric.name == family:
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    totals[sample.labels[label]] += int(sample.value)
    return totals


def _sum(registry: CollectorRegistry, family: str) -> int:
    return sum(_totals(registry, family, "organization_id").values())


def _line(counts: Counter[str]) -> str:
    shown = [f"{key} {value}" for key, value in sorted(counts.items()) if value]
    return ", ".join(shown) or "none"


LEGEND = """\
  terms      unhealthy: one error short of a limit (the next one logs it out; its team is notified)
             held: a logout the fleet breaker is holding back   logged out: keys deleted, a QR re-scan needed
             heal: the failing keys deleted, the session kept   reconnecting: known but not open right now"""

NEXT_STEPS = """
next steps (docs/ in the repository; `.venv/bin/mkdocs serve` shows them as a site)
  your Baileys backend   docs/quickstart/baileys.md   (adapter, PostgreSQL, scrape, dashboards, alerts)
  no code change         docs/quickstart/logs.md      (wa-sidecar ingest-logs reads the backend's log)
  Kubernetes             docs/quickstart/kubernetes.md
  what it decided, why   docs/concepts/rules.md, docs/concepts/safety.md
"""


def view(components: Components, tally: DemoTally, fleet: FleetStats, base: str, elapsed: float) -> str:
    runtime, registry = components.runtime, components.metrics.registry
    sessions = list(runtime.sessions())
    unhealthy = sum(1 for s in sessions if not runtime.get_session_error_stats(s.organization_phone_id)["isHealthy"])
    connected = sum(1 for s in sessions if s.connected)
    reconnecting = len(sessions) - connected  # known, not logged out, not open now: a flap or a restart
    ratio = fleet.heal_ratio
    breaker = "TRIPPED (logouts held)" if runtime.breaker_tripped else "closed"
    return "\n".join(
        [
            f"whatsapp-session-sidecar demo  {elapsed:5.0f} s   metrics {base}/metrics   API {base}/v1/sessions",
            f"  sessions   open {connected}, reconnecting {reconnecting}, unhealthy {unhealthy}, "
            f"held {runtime.held_count}, logged out {runtime.closed_count} (re-scans so far {fleet.rescans})",
            f"  errors     {_line(_totals(registry, 'whatsapp_decrypt_errors', 'kind'))}",
            f"  heals      {_line(_totals(registry, 'whatsapp_session_heals', 'kind'))}",
            f"  closes     {_line(_totals(registry, 'whatsapp_session_closes', 'reason'))}",
            f"  notified   {_line(tally.notifications)}",
            f"  fleet      {fleet.messages} messages, {fleet.patches} app-state patches, {fleet.faults_injected} "
            f"faults injected, {fleet.faults_healed} healed, {fleet.faults_logged_out} ended in a logout"
            + (f" (heal ratio {ratio:.0%})" if ratio is not None else ""),
            f"  messages   {_sum(registry, 'whatsapp_messages_undecryptable')} undecryptable, "
            f"{_sum(registry, 'whatsapp_messages_recovered')} recovered by retries, "
            f"{_sum(registry, 'whatsapp_messages_lost')} lost (after --loss-deadline "
            f"{components.config.loss_deadline:g} s); the fleet's truth: {fleet.messages_failed} failed, "
            f"{fleet.messages_recovered} re-sent and decrypted, {fleet.messages_unrecovered} never",
            f"  deaf       found {tally.liveness['deaf']}, restarted {tally.liveness['session.restarted']}, "
            f"recovered {tally.liveness['session.deaf_recovered']} (injected {fleet.deaf_injected}; "
            f"idle sessions flagged {fleet.idle_flagged})",
            f"  breaker    {breaker}",
            LEGEND,
        ]
    )


async def run_demo(
    components: Components,
    tally: DemoTally,
    base: str,
    config: FleetConfig,
    duration: float | None,
    out: TextIO = sys.stdout,
) -> FleetStats:
    """Runs the fleet against the served app until `duration` passes or the task is cancelled (Ctrl-C), refreshing
    the view every second; prints the summary either way."""
    fleet = SimFleet(base.replace("http://", "ws://") + "/v1/runtime", config, components.config.runtime_token)
    started = time.monotonic()
    tty = out.isatty()
    fleet_task = asyncio.create_task(fleet.run(duration))
    try:
        while not fleet_task.done():
            await asyncio.wait({fleet_task}, timeout=REFRESH_SECONDS)
            screen = view(components, tally, fleet.stats, base, time.monotonic() - started)
            out.write(("\x1b[H\x1b[2J" + screen + "\n") if tty else screen + "\n\n")
            out.flush()
        await fleet_task
    finally:
        if not fleet_task.done():
            fleet_task.cancel()
            await asyncio.gather(fleet_task, return_exceptions=True)
        await components.runtime.settle()
        out.write("\nsummary\n" + view(components, tally, fleet.stats, base, time.monotonic() - started) + "\n")
        ratio = fleet.stats.heal_ratio
        verdict = "no fault settled yet" if ratio is None else f"{ratio:.0%} of settled faults healed without a logout"
        out.write(f"  heal ratio {verdict}\n")
        out.write(NEXT_STEPS)
        out.flush()
    return fleet.stats
