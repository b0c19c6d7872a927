"""Which sessions --session-metrics active exports (telemetry/exported.py), on its edges."""

from __future__ import annotations

from sidecar.rules.liveness import Status
from sidecar.rules.policy import ZERO, Counters, Limits, Phase
from sidecar.telemetry.exported import exported_until, in_trouble

LIMITS = Limits()


def test_trouble_is_a_counter_unhealth_a_hold_or_a_liveness_verdict() -> None:
    assert not in_trouble(ZERO, LIMITS, Phase.ACTIVE, None)
    assert not in_trouble(ZERO, LIMITS, Phase.ACTIVE, Status.OK)
    assert in_trouble(Counters(bad_mac_errors=1), LIMITS, Phase.ACTIVE, None)
    assert in_trouble(ZERO, LIMITS, Phase.HELD, None)
    assert in_trouble(ZERO, LIMITS, Phase.ACTIVE, Status.SUSPECT)
    assert in_trouble(ZERO, LIMITS, Phase.ACTIVE, Status.DEAF)


def test_a_session_keeps_its_series_for_the_window_after_its_trouble_or_its_last_error() -> None:
    window = 100.0
    assert exported_until(False, None, None, 1000.0, window) is None
    assert exported_until(True, None, None, 1000.0, window) == 1100.0
    assert exported_until(False, None, 1100.0, 1099.0, window) == 1100.0  # kept after the trouble ended
    assert exported_until(False, None, 1100.0, 1100.5, window) is None
    assert exported_until(False, 950.0, None, 1000.0, window) == 1050.0  # a window from the last error
    assert exported_until(False, 950.0, None, 1050.5, window) is None
    assert exported_until(False, 950.0, 1200.0, 1100.0, window) == 1200.0  # the later of the two
