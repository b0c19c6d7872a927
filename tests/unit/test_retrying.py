"""RetryLog: a warning when a retry loop first fails and when its reason changes, a summary once per interval,
one line when it works again."""

from __future__ import annotations

import logging

import pytest

from sidecar.retrying import RetryLog


def test_said_once_then_summarised_then_recovered(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    retries = RetryLog(logging.getLogger("sidecar.test"), "load stored counters", clock=lambda: now[-1])
    caplog.set_level(logging.INFO, logger="sidecar.test")
    for second in range(130):  # a try a second for 130 s, the same reason
        now.append(100.0 + second)
        retries.failed(ConnectionRefusedError("refused"))
    now.append(231.0)
    retries.failed("the database is starting up")  # another reason: said at once
    retries.succeeded()
    retries.succeeded()  # nothing more to say
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "cannot load stored counters yet: refused; retrying, said again once a minute while it lasts"),
        ("WARNING", "still cannot load stored counters after 60s and 61 tries: refused"),
        ("WARNING", "still cannot load stored counters after 120s and 121 tries: refused"),
        ("WARNING", "still cannot load stored counters after 131s and 131 tries: the database is starting up"),
        ("INFO", "can load stored counters again after 131s and 131 failed tries"),
    ]
    assert not retries.failing
