"""Fleet safety rules, pure (the caller passes the time): the circuit breaker that stops logout storms, and the
detectors of logouts that do not stick and of reconnect loops.

A WhatsApp-side incident hits many tenants at once; logging them all out would turn an outage into thousands of
QR re-scans. The breaker lets automatic crypto-limit closes through until too many happen within a window
(an absolute count, or a share of the live sessions), then holds every further one until an operator decides.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum


class Mode(StrEnum):
    ENFORCE = "enforce"
    OBSERVE = "observe"  # decide, count, trace, alert and notify; delete no key and end no socket


class IncidentKind(StrEnum):
    RECONNECTED_AFTER_LOGOUT = "reconnected_after_logout"
    RECONNECT_LOOP = "reconnect_loop"
    CREDENTIALS_CONFLICT = "credentials_conflict"
    DEAF = "deaf"  # connected, pings answered, nothing arrives (rules/liveness.py)


CONFLICT_STATUS = 440  # DisconnectReason.connectionReplaced: another client took the same credentials


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    max_closes: int = 20  # automatic crypto closes allowed within the window
    max_share: float = 0.1  # ... or this share of the live sessions, whichever is larger
    window_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.max_closes < 1:
            raise ValueError("breaker max closes must be at least 1")
        if not 0 < self.max_share <= 1:
            raise ValueError("breaker max share must be in (0, 1]")
        if self.window_seconds <= 0:
            raise ValueError("breaker window must be positive")

    def allowed(self, live_sessions: int) -> int:
        return max(self.max_closes, int(self.max_share * live_sessions))


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    tripped: bool
    tripped_at: float | None
    closes_in_window: int
    allowed_in_window: int
    held: int
    kept_by: str | None


@dataclass
class Breaker:
    """Closes are counted per second of the window, so its memory is bounded by the window's length, not by how
    many closes a storm brings (one timestamp per close grew by 25 MB at 2,600 closes/s in a 5-minute window)."""

    config: BreakerConfig
    tripped_at: float | None = None
    kept_by: str | None = None  # the operator who chose to keep it tripped
    _buckets: deque[list[float]] = field(default_factory=deque)  # [second, closes], oldest first
    _in_window: int = 0

    @property
    def tripped(self) -> bool:
        return self.tripped_at is not None

    def admit(self, now: float, live_sessions: int) -> bool:
        """May one more automatic crypto close happen now? A refusal that crosses the threshold trips it."""
        self._forget_before(now - self.config.window_seconds)
        if self.tripped:
            return False
        if self._in_window + 1 > self.config.allowed(live_sessions):
            self.tripped_at = now
            return False
        second = float(int(now))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([second, 1])
        self._in_window += 1
        return True

    def release(self) -> None:
        """The operator resumes automatic logouts; the window starts empty."""
        self.tripped_at, self.kept_by = None, None
        self._buckets.clear()
        self._in_window = 0

    def keep(self, operator: str) -> None:
        self.kept_by = operator

    def trip(self, now: float, operator: str) -> None:
        """An operator stops automatic logouts by hand."""
        if self.tripped_at is None:
            self.tripped_at = now
        self.kept_by = operator

    def status(self, now: float, live_sessions: int, held: int) -> BreakerStatus:
        self._forget_before(now - self.config.window_seconds)
        return BreakerStatus(
            self.tripped, self.tripped_at, self._in_window, self.config.allowed(live_sessions), held, self.kept_by
        )

    def _forget_before(self, cutoff: float) -> None:
        """Drops the seconds that left the window (a bucket goes once its whole second is out)."""
        while self._buckets and self._buckets[0][0] + 1 <= cutoff:
            self._in_window -= int(self._buckets.popleft()[1])

    @property
    def buckets(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class LoopConfig:
    closes: int = 5  # this many closes of one phone within the window is a reconnect loop
    conflicts: int = 2  # this many 440 closes within the window: two runtimes share the credentials
    window_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class LoopState:
    """One phone's recent closes (time, status code), oldest first, and when each incident was last reported."""

    closes: tuple[tuple[float, int | None], ...] = ()
    reported: tuple[tuple[IncidentKind, float], ...] = ()


def on_close(
    state: LoopState, now: float, status_code: int | None, config: LoopConfig
) -> tuple[LoopState, list[IncidentKind]]:
    """A phone's connection closed: the incidents it shows now (each reported once until the phone has been quiet
    for a window), and the state to keep. Pure: the fleet keeps the state in PostgreSQL, one replica in memory."""
    keep = max(config.closes, config.conflicts)
    closes = (*state.closes, (now, status_code))[-keep:]
    cutoff = now - config.window_seconds
    recent = [code for moment, code in closes if moment > cutoff]
    found = []
    if len(recent) >= config.closes:
        found.append(IncidentKind.RECONNECT_LOOP)
    if sum(1 for code in recent if code == CONFLICT_STATUS) >= config.conflicts:
        found.append(IncidentKind.CREDENTIALS_CONFLICT)
    reported = dict(state.reported)
    fresh = []
    for kind in found:
        last = reported.get(kind)
        if last is None or last <= cutoff:
            fresh.append(kind)
        reported[kind] = now
    return LoopState(closes, tuple(reported.items())), fresh


def is_quiet(state: LoopState, now: float, config: LoopConfig) -> bool:
    """No close and no report within the window: the state is as good as empty (on_close would ignore it)."""
    cutoff = now - config.window_seconds
    return all(moment <= cutoff for moment, _ in state.closes) and all(at <= cutoff for _, at in state.reported)


@dataclass
class LoopDetector:
    """Per phone, the recent closes (one replica's memory; fleet mode keeps LoopState in the database)."""

    config: LoopConfig = field(default_factory=LoopConfig)
    _states: dict[int, LoopState] = field(default_factory=dict)

    def on_close(self, phone_id: int, now: float, status_code: int | None) -> list[IncidentKind]:
        state, fresh = on_close(self._states.get(phone_id, LoopState()), now, status_code, self.config)
        self._states[phone_id] = state
        return fresh

    def forget(self, phone_id: int) -> None:
        self._states.pop(phone_id, None)

    def expire(self, now: float) -> int:
        """Forget phones quiet for a whole window (their state could no longer report anything); returns how many."""
        quiet = [phone_id for phone_id, state in self._states.items() if is_quiet(state, now, self.config)]
        for phone_id in quiet:
            del self._states[phone_id]
        return len(quiet)

    @property
    def tracked(self) -> int:
        return len(self._states)


def is_reconnect_after_logout(logged_out_at: float | None, now: float, stick_seconds: float, new_login: bool) -> bool:
    """An `open` soon after the sidecar logged the phone out, without a new login (QR pairing), means some
    runtime reconnected with credentials that should be dead: the logout did not stick."""
    return logged_out_at is not None and not new_login and now - logged_out_at <= stick_seconds
