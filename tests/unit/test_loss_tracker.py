"""The loss tracker's rules: pending until recovered or the deadline; repeats are one message; bounded."""

from sidecar.rules.loss import LossTracker, Lost, Outcome


def test_recovered_in_time_is_not_lost_and_the_rest_is_once() -> None:
    tracker = LossTracker(deadline=10.0, per_session=3)
    assert tracker.failed(1, "a", now=0.0) is Outcome.PENDING
    assert tracker.failed(1, "b", now=1.0) is Outcome.PENDING
    assert tracker.failed(1, "b", now=2.0) is Outcome.REPEATED
    assert tracker.recovered(1, "a") is True
    assert tracker.recovered(1, "a") is False  # already recovered
    assert tracker.recovered(2, "zzz") is False  # nothing failed there
    assert tracker.expired(now=10.5) == []
    assert tracker.expired(now=11.0) == [Lost(1, "b")]
    assert tracker.expired(now=99.0) == []
    assert tracker.lost(1) == 1 and tracker.pending(1) == 0
    assert tracker.recovered(1, "b") is False  # too late: it stays lost


def test_ids_beyond_the_bound_are_unknown_not_dropped_silently() -> None:
    tracker = LossTracker(deadline=1.0, per_session=2)
    outcomes = [tracker.failed(7, f"m{n}", now=0.0) for n in range(4)]
    assert outcomes == [Outcome.PENDING, Outcome.PENDING, Outcome.UNKNOWN, Outcome.UNKNOWN]
    assert tracker.pending(7) == 2
    assert len(tracker.expired(now=1.0)) == 2
    tracker.forget(7)
    assert tracker.lost(7) == 0 and tracker.losing() == {}
