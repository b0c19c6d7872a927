"""What a retry loop says while something it needs is away (PostgreSQL, most often): a warning when it first
fails and when the reason changes, then a summary once per `summary_seconds` (how long, how many tries), and one
line when it works again. A loop that retries every second no longer writes a warning every second."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

SUMMARY_SECONDS = 60.0


class RetryLog:
    def __init__(
        self,
        log: logging.Logger,
        what: str,
        level: int = logging.WARNING,
        summary_seconds: float = SUMMARY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        meanwhile: str = "",
    ) -> None:
        """`what`: the thing tried, said after "cannot" ("load stored counters"); `meanwhile`: what stands in for
        it while it fails, said with the first warning ("polling meanwhile")."""
        self._log = log
        self._what = what
        self._meanwhile = f" ({meanwhile})" if meanwhile else ""
        self._level = level
        self._summary_seconds = summary_seconds
        self._clock = clock
        self._since: float | None = None
        self._tries = 0
        self._reason = ""
        self._said_at = 0.0

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException | str) -> None:
        now, reason = self._clock(), str(error)
        self._tries += 1
        if self._since is None:
            self._since, self._said_at, self._reason = now, now, reason
            self._log.log(self._level, "cannot %s yet%s: %s; retrying, said again once a %s while it lasts",
                          self._what, self._meanwhile, reason, _every(self._summary_seconds))  # fmt: skip
        elif reason != self._reason or now - self._said_at >= self._summary_seconds:
            self._said_at, self._reason = now, reason
            self._log.log(self._level, "still cannot %s after %.0fs and %d tries: %s",
                          self._what, now - self._since, self._tries, reason)  # fmt: skip

    def succeeded(self) -> None:
        if self._since is not None:
            self._log.info("can %s again after %.0fs and %d failed tries", self._what, self._clock() - self._since,
                           self._tries)  # fmt: skip
        self._since, self._tries, self._reason = None, 0, ""


def _every(seconds: float) -> str:
    return "minute" if seconds == 60 else f"{seconds:g}s"
