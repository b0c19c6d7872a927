"""Deaf sessions: connected, keep-alive pings answered, and yet nothing arrives. Pure: the caller passes the time.

Each session's baseline is its own inbound traffic: the gaps between the inbound stanzas its runtime reported
(`activity` events carry the time of the last one): its recent gaps, and its long gaps of the last
`baseline_seconds` (a week by default), so a session that is quiet every night is not suspect every night. A
connected session that is normally busy and has been silent for much longer than its own longest gap (never less
than a floor) becomes *suspect* and is probed: a real round trip with WhatsApp's server through its socket. A
failed probe, or silence that goes on `confirm_seconds` past a successful probe, makes it *deaf*. Traffic
arriving again makes it *recovered*. A session is judged once its history spans `min_history_seconds` (a day):
before that its first quiet evening would look like deafness. The history is this process's memory, so a
restarted sidecar watches again a day later (lower the setting to watch sooner, at the price of first-night
reports; report-only, `--deaf-action none`, is the default).

Why these defaults (LivenessConfig): an account with a few messages an hour has gaps of tens of minutes, so it
becomes suspect only after four times its longest recent gap; the floor keeps a busy account with second-long
gaps from being probed over a quiet coffee break; a session needs `min_reports` reports with traffic before its
gaps mean anything, so an idle account (no history) is never called deaf on silence alone. A successful probe
shows only that the socket answers (pings are answered on deaf sessions too), so it buys `confirm_seconds` more
before the verdict instead of clearing the session.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class Status(StrEnum):
    OK = "ok"
    SUSPECT = "suspect"  # silent past its threshold; a probe is out or has answered
    DEAF = "deaf"  # declared deaf; only traffic clears it (a reconnect restarts the watch)


class DeafAction(StrEnum):
    NONE = "none"  # report only
    RESTART = "restart"  # a session.restart command: the backend reconnects (never a logout)


class Action(StrEnum):
    NONE = "none"
    PROBE = "probe"
    DEAF = "deaf"
    RECOVERED = "recovered"


@dataclass(frozen=True, slots=True)
class LivenessConfig:
    floor_seconds: float = 600.0  # never suspect before this much silence
    gap_factor: float = 4.0  # suspect after this many times the session's longest recent gap
    confirm_seconds: float = 300.0  # silence this long after a successful probe: deaf
    min_reports: int = 10  # activity reports with traffic before the session's gaps are its baseline
    history: int = 32  # recent gaps remembered
    baseline_seconds: float = 7 * 86_400.0  # long gaps (nights, weekends) remembered this long
    min_history_seconds: float = 86_400.0  # a session is judged once its traffic history spans this long
    long_gaps: int = 32  # at most this many long gaps remembered (the longest kept)

    def __post_init__(self) -> None:
        if self.floor_seconds <= 0 or self.confirm_seconds <= 0:
            raise ValueError("liveness floor and confirm times must be positive")
        if self.gap_factor < 1:
            raise ValueError("liveness gap factor must be at least 1")
        if self.min_reports < 1 or self.history < 1 or self.long_gaps < 1:
            raise ValueError("liveness min reports and history must be at least 1")
        if self.baseline_seconds <= 0 or self.min_history_seconds < 0:
            raise ValueError("liveness baseline must be positive")

    @property
    def long_gap_seconds(self) -> float:
        """A gap this long could move a threshold above the floor: worth remembering past the recent ones."""
        return self.floor_seconds / self.gap_factor


class Liveness(NamedTuple):
    """One session's watch: its traffic baseline and where it stands. Immutable, and a NamedTuple rather than a
    frozen dataclass: a reconnect flood builds one per event, and a tuple is built five times faster."""

    last_inbound: float | None = None
    connected_since: float | None = None  # None while disconnected
    gaps: tuple[float, ...] = ()
    long_gaps: tuple[tuple[float, float], ...] = ()  # (when it ended, seconds), within the baseline period
    first_inbound: float | None = None  # the start of its traffic history (as this watch knows it)
    reports: int = 0
    status: Status = Status.OK
    probing: bool = False
    probe_ok_at: float | None = None
    declared_at: float | None = None  # when it was last declared deaf on this connection

    @property
    def connected(self) -> bool:
        return self.connected_since is not None


def threshold(state: Liveness, config: LivenessConfig, now: float) -> float | None:
    """Silence that makes this session suspect; None while it has no traffic history (never deaf on silence)."""
    if state.reports < config.min_reports or not state.gaps:
        return None
    if state.last_inbound is None or state.first_inbound is None:
        return None
    if state.last_inbound - state.first_inbound < config.min_history_seconds:
        return None  # its traffic does not span a night yet: a quiet evening could look like deafness
    since = now - config.baseline_seconds
    longest = max([*state.gaps, *(gap for ended, gap in state.long_gaps if ended >= since)])
    return max(config.floor_seconds, config.gap_factor * longest)


def silence(state: Liveness, now: float) -> float:
    """Seconds without inbound traffic on this connection (0 while disconnected)."""
    if state.connected_since is None:
        return 0.0
    since = state.connected_since if state.last_inbound is None else max(state.last_inbound, state.connected_since)
    return max(0.0, now - since)


def on_activity(state: Liveness, last_inbound_at: float, config: LivenessConfig) -> tuple[Liveness, Action]:
    """A report of inbound traffic whose last stanza arrived at `last_inbound_at`."""
    previous = state.last_inbound
    if previous is not None and last_inbound_at <= previous:
        return state, Action.NONE  # nothing newer than what is known (a late or repeated report)
    gaps, long_gaps = state.gaps, state.long_gaps
    # A gap counts only within one connection: time spent disconnected is not the session's rhythm.
    if previous is not None and state.connected_since is not None and previous >= state.connected_since:
        gap = last_inbound_at - previous
        gaps = (*gaps, gap)[-config.history :]
        if gap >= config.long_gap_seconds:
            since = last_inbound_at - config.baseline_seconds
            kept = [(ended, seconds) for ended, seconds in long_gaps if ended >= since] + [(last_inbound_at, gap)]
            long_gaps = tuple(sorted(kept, key=lambda item: item[1])[-config.long_gaps :])
    action = Action.RECOVERED if state.status is Status.DEAF else Action.NONE
    fresh = state._replace(
        last_inbound=last_inbound_at,
        gaps=gaps,
        long_gaps=long_gaps,
        first_inbound=last_inbound_at if state.first_inbound is None else state.first_inbound,
        reports=state.reports + 1,
        status=Status.OK,
        probing=False,
        probe_ok_at=None,
        declared_at=None,
    )
    return fresh, action


def on_connection(state: Liveness, now: float, connected: bool) -> Liveness:
    """An open starts a new watch (after a restart the session gets its whole threshold again); a close stops it."""
    if connected:  # built directly, not with _replace(): a reconnect flood is one of these per event
        s = state
        return Liveness(s.last_inbound, now, s.gaps, s.long_gaps, s.first_inbound, s.reports, s.status)
    return state._replace(connected_since=None, probing=False, probe_ok_at=None)


def on_tick(state: Liveness, now: float, config: LivenessConfig) -> tuple[Liveness, Action]:
    """Time passed: a probe to send, a verdict to give, or nothing."""
    limit = threshold(state, config, now)
    if limit is None or not state.connected or state.probing or state.declared_at is not None:
        return state, Action.NONE
    if silence(state, now) <= limit:
        return state, Action.NONE
    if state.probe_ok_at is None:
        status = Status.DEAF if state.status is Status.DEAF else Status.SUSPECT
        return state._replace(status=status, probing=True), Action.PROBE
    if now - state.probe_ok_at >= config.confirm_seconds:
        return _declared(state, now), Action.DEAF
    return state, Action.NONE


def on_probe(state: Liveness, now: float, ok: bool) -> tuple[Liveness, Action]:
    """The probe's answer: a failure is a verdict; a success buys `confirm_seconds`."""
    if not state.probing:
        return state, Action.NONE  # traffic or a reconnect overtook the probe
    if ok:
        return state._replace(probing=False, probe_ok_at=now), Action.NONE
    return _declared(state._replace(probing=False), now), Action.DEAF


def _declared(state: Liveness, now: float) -> Liveness:
    return state._replace(status=Status.DEAF, probe_ok_at=None, declared_at=now)
