"""The pure safety rules: the held phase, the windowed health policy, the breaker and the incident detectors."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.rules.policy import (
    BadDecrypt,
    BadMac,
    Close,
    CloseReason,
    ConnectionOpened,
    Counters,
    Heal,
    HealthPolicy,
    Hold,
    Limits,
    NoAction,
    OperatorClose,
    Phase,
    PolicyConfig,
    SessionState,
    decide,
)
from sidecar.rules.safety import (
    Breaker,
    BreakerConfig,
    IncidentKind,
    LoopConfig,
    LoopDetector,
    is_reconnect_after_logout,
)

WINDOWED = PolicyConfig(health=HealthPolicy.WINDOWED, window_seconds=600.0)


def test_a_limit_with_closes_forbidden_holds_and_keeps_counting() -> None:
    state = SessionState(Counters(bad_mac_errors=2))
    held = decide(state, BadMac(), PolicyConfig(), automatic_closes_allowed=False)
    assert held.decision == Hold(CloseReason.BAD_MAC_LIMIT, "3 Bad MAC errors (limit 3)", Counters(3, 0))
    assert held.state.phase is Phase.HELD
    more = decide(held.state, BadMac(), PolicyConfig())
    assert more.decision == NoAction() and more.state.counters.bad_mac_errors == 4, "counters keep counting"
    assert decide(more.state, OperatorClose("by hand"), PolicyConfig()).decision == Close(
        CloseReason.FORCED, "by hand", Counters(4, 0)
    )
    reopened = decide(more.state, ConnectionOpened(), PolicyConfig())
    assert reopened.state == SessionState(), "an open is a clean slate for a held session too"


def test_windowed_one_broken_contact_is_healed_but_never_logs_out() -> None:
    state = SessionState()
    for second in range(50):
        transition = decide(state, BadMac("15550002222", at=float(second)), WINDOWED)
        assert isinstance(transition.decision, Heal)
        state = transition.state
    assert state.counters.bad_mac_errors == 1


def test_windowed_many_failing_peers_log_out_and_old_errors_expire() -> None:
    state = SessionState()
    for index, peer in enumerate(("15550000001", "15550000002")):
        state = decide(state, BadMac(peer, at=float(index)), WINDOWED).state
    expired = decide(state, BadMac("15550000003", at=1000.0), WINDOWED)
    assert isinstance(expired.decision, Heal) and expired.state.counters.bad_mac_errors == 1, "the first two left"
    closing = decide(state, BadMac("15550000003", at=10.0), WINDOWED)
    assert isinstance(closing.decision, Close) and closing.decision.reason is CloseReason.BAD_MAC_LIMIT


peers = st.one_of(st.none(), st.sampled_from(["15550000001", "15550000002", "15550000003", "15550000004"]))
windowed_events = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=900, allow_nan=False),
        st.one_of(st.builds(lambda p: ("mac", p), peers), st.just(("decrypt", None)), st.just(("open", None))),
    ),
    max_size=60,
)


@given(windowed_events, st.integers(min_value=1, max_value=4))
def test_windowed_properties(raw: list[tuple[float, tuple[str, str | None]]], limit: int) -> None:
    config = PolicyConfig(limits=Limits(limit, limit + 1), health=HealthPolicy.WINDOWED, window_seconds=120.0)
    state = SessionState()
    now = 0.0
    for step, (kind, peer) in raw:
        now += step / 10  # time only moves forward
        if state.phase is not Phase.ACTIVE and kind != "open":
            before = state
            event = BadMac(peer, at=now) if kind == "mac" else BadDecrypt(at=now)
            assert decide(state, event, config).decision == NoAction(), "closing/closed: no action until open"
            assert decide(state, event, config).state.phase is before.phase
            continue
        if kind == "open":
            transition = decide(state, ConnectionOpened(), config)
            assert transition.state.counters == Counters() or state.phase is Phase.CLOSING
        else:
            event = BadMac(peer, at=now) if kind == "mac" else BadDecrypt(at=now)
            transition = decide(state, event, config)
            counters = transition.state.counters
            assert counters.bad_mac_errors <= limit and counters.bad_decrypt_errors <= limit + 1
            named = {p for t, p in transition.state.recent.bad_mac if p is not None}
            assert len(named) == sum(1 for _, p in transition.state.recent.bad_mac if p is not None), "peers once"
            assert all(t > now - 120.0 for t, _ in transition.state.recent.bad_mac), "nothing outside the window"
            if isinstance(transition.decision, Close):
                assert transition.decision.reason in (CloseReason.BAD_MAC_LIMIT, CloseReason.BAD_DECRYPT_LIMIT)
        state = transition.state


def test_breaker_trips_past_the_count_and_holds_until_released() -> None:
    breaker = Breaker(BreakerConfig(max_closes=3, max_share=0.01, window_seconds=60))
    assert [breaker.admit(float(t), 100) for t in range(5)] == [True, True, True, False, False]
    assert breaker.tripped and breaker.tripped_at == 3.0
    assert not breaker.admit(1000.0, 100), "a tripped breaker stays tripped after the window"
    breaker.release()
    assert breaker.admit(1001.0, 100)


def test_breaker_threshold_is_the_larger_of_count_and_share() -> None:
    breaker = Breaker(BreakerConfig(max_closes=2, max_share=0.05, window_seconds=60))
    assert sum(breaker.admit(0.0, 200) for _ in range(20)) == 10, "5% of 200 live sessions"
    calm = Breaker(BreakerConfig(max_closes=2, max_share=0.05, window_seconds=60))
    assert [calm.admit(t * 100.0, 10) for t in range(10)] == [True] * 10, "spread out, it never trips"


@given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=80), st.integers(1, 10))
def test_breaker_never_admits_more_than_allowed_within_a_window(steps: list[float], max_closes: int) -> None:
    config = BreakerConfig(max_closes=max_closes, max_share=0.01, window_seconds=30)
    breaker = Breaker(config)
    admitted: list[float] = []
    now = 0.0
    for step in steps:
        now += step
        if breaker.admit(now, 10):
            admitted.append(now)
        assert sum(1 for moment in admitted if moment > now - 30) <= max_closes
    if breaker.tripped:
        assert not breaker.admit(now + 10_000, 10)


def test_reconnect_loops_and_credentials_conflicts_are_reported_once_per_quiet_window() -> None:
    loops = LoopDetector(LoopConfig(closes=3, conflicts=2, window_seconds=60))
    reported = [loops.on_close(42, float(t), 428) for t in range(4)]
    assert reported == [[], [], [IncidentKind.RECONNECT_LOOP], []]
    assert loops.on_close(42, 200.0, 428) == [] and loops.on_close(42, 201.0, 428) == []
    assert loops.on_close(42, 202.0, 428) == [IncidentKind.RECONNECT_LOOP], "again after a quiet window"
    assert loops.on_close(7, 0.0, 440) == [] and loops.on_close(7, 1.0, 440) == [IncidentKind.CREDENTIALS_CONFLICT]
    loops.forget(42)
    assert loops.tracked == 1


def test_a_reconnect_after_logout_is_an_open_soon_after_without_a_new_login() -> None:
    assert is_reconnect_after_logout(100.0, 103.0, 3600, new_login=False)
    assert not is_reconnect_after_logout(100.0, 103.0, 3600, new_login=True)
    assert not is_reconnect_after_logout(100.0, 100.0 + 3601, 3600, new_login=False)
    assert not is_reconnect_after_logout(None, 103.0, 3600, new_login=False)


def test_breaker_memory_is_bounded_by_the_window_not_by_the_close_rate() -> None:
    breaker = Breaker(BreakerConfig(max_closes=10_000_000, window_seconds=60))
    for index in range(200_000):
        assert breaker.admit(index / 1000, 10)  # 1,000 closes a second for 200 seconds
    assert breaker.buckets <= 61 and breaker.status(200.0, 10, 0).closes_in_window <= 61_000
