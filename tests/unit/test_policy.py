"""The pure session rules: examples for each rule, then properties over random event sequences."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.rules.policy import (
    APP_STATE_SYNC_PREFIX,
    BadDecrypt,
    BadMac,
    Close,
    CloseCompleted,
    CloseReason,
    ConnectionClosed,
    ConnectionOpened,
    Counters,
    Event,
    Heal,
    KeyScope,
    Limits,
    NoAction,
    OperatorClose,
    Phase,
    PolicyConfig,
    SessionState,
    decide,
    error_stats,
    is_healthy,
)

DEFAULT = PolicyConfig()


def run(events: Sequence[Event], config: PolicyConfig = DEFAULT) -> tuple[SessionState, list[object]]:
    state = SessionState()
    decisions: list[object] = []
    for event in events:
        transition = decide(state, event, config)
        state = transition.state
        decisions.append(transition.decision)
    return state, decisions


def test_bad_mac_below_limit_heals_only_the_named_peers_sessions() -> None:
    state, decisions = run([BadMac("15550002222")])
    assert state.counters == Counters(bad_mac_errors=1)
    assert decisions == [Heal(KeyScope.PEER_SESSION, ("session-15550002222.", "session-15550002222_"))]


def test_bad_mac_without_peer_heals_sessions_and_sender_keys_but_never_prekeys() -> None:
    _, decisions = run([BadMac()])
    heal = decisions[0]
    assert isinstance(heal, Heal)
    assert heal.key_prefixes == ("session-", "sender-key-")
    _, decisions = run([BadMac()], PolicyConfig(delete_prekeys_on_heal=True))
    assert isinstance(decisions[0], Heal) and "pre-key-" in decisions[0].key_prefixes


def test_third_bad_mac_closes_with_the_counts() -> None:
    state, decisions = run([BadMac(), BadMac(), BadMac()])
    assert decisions[2] == Close(CloseReason.BAD_MAC_LIMIT, "3 Bad MAC errors (limit 3)", Counters(3, 0))
    assert state.phase is Phase.CLOSING


def test_bad_decrypt_heals_app_state_until_the_fifth_closes() -> None:
    _, decisions = run([BadDecrypt()] * 5)
    assert decisions[:4] == [Heal(KeyScope.APP_STATE_SYNC, (APP_STATE_SYNC_PREFIX,))] * 4
    assert isinstance(decisions[4], Close) and decisions[4].reason is CloseReason.BAD_DECRYPT_LIMIT


def test_limits_are_configurable() -> None:
    config = PolicyConfig(limits=Limits(max_bad_mac_errors=5, max_bad_decrypt_errors=2))
    _, decisions = run([BadMac()] * 4 + [BadDecrypt()] * 2, config)
    assert all(isinstance(d, Heal) for d in decisions[:5])
    assert isinstance(decisions[5], Close) and decisions[5].reason is CloseReason.BAD_DECRYPT_LIMIT


def test_is_healthy_turns_false_one_short_of_a_limit() -> None:
    limits = Limits()
    assert is_healthy(Counters(1, 3), limits)
    assert not is_healthy(Counters(2, 0), limits)
    assert not is_healthy(Counters(0, 4), limits)
    assert error_stats(Counters(2, 1), limits) == {
        "badMacErrors": 2,
        "badDecryptErrors": 1,
        "maxBadMacErrors": 3,
        "maxBadDecryptErrors": 5,
        "isHealthy": False,
    }


def test_open_resets_both_counters() -> None:
    state, _ = run([BadMac(), BadDecrypt(), BadDecrypt(), ConnectionOpened()])
    assert state == SessionState()


def test_only_critical_close_codes_close_the_session() -> None:
    _, decisions = run([ConnectionClosed(515), ConnectionClosed(428), ConnectionClosed(None)])
    assert all(isinstance(d, NoAction) for d in decisions)
    _, decisions = run([ConnectionClosed(401)])
    assert isinstance(decisions[0], Close) and decisions[0].reason is CloseReason.CONNECTION_ERROR


def test_operator_close_is_forced_and_a_second_one_does_nothing() -> None:
    state, decisions = run([OperatorClose("Maintenance restart"), OperatorClose("again")])
    assert decisions[0] == Close(CloseReason.FORCED, "Maintenance restart", Counters())
    assert isinstance(decisions[1], NoAction)
    assert state.phase is Phase.CLOSING


def test_open_during_a_close_does_not_cancel_it() -> None:
    state, _ = run([BadMac(), BadMac(), BadMac(), ConnectionOpened()])
    assert state.phase is Phase.CLOSING
    state, _ = run([BadMac(), BadMac(), BadMac(), CloseCompleted(), ConnectionOpened()])
    assert state == SessionState()


# Properties ---------------------------------------------------------------------------------------------

peers = st.one_of(st.none(), st.from_regex(r"[1-9][0-9]{6,14}", fullmatch=True))
events = st.one_of(
    st.builds(BadMac, peers),
    st.just(BadDecrypt()),
    st.just(ConnectionOpened()),
    st.builds(ConnectionClosed, st.sampled_from([None, 401, 403, 408, 411, 428, 440, 500, 503, 515])),
    st.builds(OperatorClose, st.text(min_size=1, max_size=20)),
    st.just(CloseCompleted()),
)
limits = st.builds(Limits, st.integers(1, 6), st.integers(1, 8))


@settings(max_examples=400)
@given(st.lists(events, max_size=60), limits)
def test_properties_over_random_event_sequences(sequence: list[Event], limit: Limits) -> None:
    config = PolicyConfig(limits=limit)
    state = SessionState()
    for event in sequence:
        transition = decide(state, event, config)
        after, decision = transition.state, transition.decision
        # Counters never exceed the limits.
        assert 0 <= after.counters.bad_mac_errors <= limit.max_bad_mac_errors
        assert 0 <= after.counters.bad_decrypt_errors <= limit.max_bad_decrypt_errors
        # `open` always resets.
        if isinstance(event, ConnectionOpened):
            assert after.counters == Counters()
        # A closing or closed session takes no action until it opens again.
        if state.phase is not Phase.ACTIVE:
            assert isinstance(decision, NoAction)
            if not isinstance(event, ConnectionOpened | CloseCompleted):
                assert after == state
        # A close always follows the limit-th error, and only then for that reason.
        if state.phase is Phase.ACTIVE and isinstance(event, BadMac):
            reached = state.counters.bad_mac_errors + 1 == limit.max_bad_mac_errors
            assert isinstance(decision, Close) == reached
            if reached:
                assert isinstance(decision, Close) and decision.reason is CloseReason.BAD_MAC_LIMIT
        if state.phase is Phase.ACTIVE and isinstance(event, BadDecrypt):
            reached = state.counters.bad_decrypt_errors + 1 == limit.max_bad_decrypt_errors
            assert isinstance(decision, Close) == reached
        # Every close moves the session out of ACTIVE.
        if isinstance(decision, Close):
            assert after.phase is Phase.CLOSING
        state = after
