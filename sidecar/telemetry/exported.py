"""Which sessions get their own series (`--session-metrics`): the mode, and the rule for a session with something
to say. Pure: the caller gives the time."""

from __future__ import annotations

from enum import StrEnum

from sidecar.rules.liveness import Status
from sidecar.rules.policy import ZERO, Counters, Limits, Phase, is_healthy

DEFAULT_WINDOW_SECONDS = 3600.0  # --session-metrics-window: an active session keeps its series this long after


class SessionMetrics(StrEnum):
    """--session-metrics: which sessions get per-session series."""

    ALL = "all"  # every tracked session
    ACTIVE = "active"  # the default: those with something to say, for the window after they last had
    NONE = "none"  # fleet families only


def in_trouble(counters: Counters, limits: Limits, phase: Phase, status: Status | None) -> bool:
    """A session state worth its own series while it lasts, and for a window after: a non-zero counter,
    unhealthy, held by the breaker, or deaf or suspect."""
    return (
        counters != ZERO
        or not is_healthy(counters, limits)
        or phase is Phase.HELD
        or (status is not None and status is not Status.OK)
    )


def exported_until(
    trouble: bool, last_error_at: float | None, kept_until: float | None, now: float, window: float
) -> float | None:
    """Until when a session keeps its series (None: it has none now). In trouble: a window from now (so a series
    never vanishes the moment its condition ends); else a window from its last error, or what an earlier scrape
    gave it."""
    ends = [kept_until or 0.0]
    if trouble:
        ends.append(now + window)
    if last_error_at is not None:
        ends.append(last_error_at + window)
    until = max(ends)
    return until if until >= now else None
