"""The liveness policy's properties (hypothesis): an idle session is never deaf, a session whose traffic never
stops is never deaf, a session that goes silent is found deaf, and larger thresholds never find it sooner."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.rules.liveness import (
    Action,
    Liveness,
    LivenessConfig,
    Status,
    on_activity,
    on_connection,
    on_probe,
    on_tick,
    silence,
    threshold,
)

TICK = 5.0


@dataclass(frozen=True)
class Trace:
    inbound: tuple[float, ...]  # times of inbound stanzas (one activity report each)
    closes: tuple[tuple[float, float], ...] = ()  # (close, reopen) times
    end: float = 0.0


def run(trace: Trace, config: LivenessConfig, probe_ok: Callable[[float], bool]) -> list[tuple[float, Action]]:
    """Drives the policy over the trace as the runtime does: reports, connection changes, ticks, probe answers."""
    state = on_connection(Liveness(), 0.0, True)
    actions: list[tuple[float, Action]] = []
    events: list[tuple[float, int, float]] = [(t, 0, t) for t in trace.inbound]
    for closed, reopened in trace.closes:
        events += [(closed, 1, 0.0), (reopened, 2, 0.0)]
    events += [(k * TICK, 3, 0.0) for k in range(int(trace.end / TICK) + 1)]
    for now, kind, at in sorted(events):
        if kind == 0:
            if not state.connected:
                continue  # nothing arrives on a closed connection
            state, action = on_activity(state, at, config)
        elif kind == 1:
            state, action = on_connection(state, now, False), Action.NONE
        elif kind == 2:
            state, action = on_connection(state, now, True), Action.NONE
        else:
            state, action = on_tick(state, now, config)
            if action is Action.PROBE:
                actions.append((now, action))
                state, action = on_probe(state, now, probe_ok(now))
        if action is not Action.NONE:
            actions.append((now, action))
    return actions


def deaf_times(actions: Sequence[tuple[float, Action]]) -> list[float]:
    return [now for now, action in actions if action is Action.DEAF]


configs = st.builds(
    LivenessConfig,
    floor_seconds=st.floats(30, 2_000),
    gap_factor=st.floats(1, 8),
    confirm_seconds=st.floats(10, 1_000),
    min_reports=st.integers(1, 20),
    min_history_seconds=st.floats(0, 15),  # within every trace's busy span (at least 19 s)
)


@settings(max_examples=200, deadline=None)
@given(config=configs, end=st.floats(0, 20_000), closes=st.lists(st.floats(0, 20_000), max_size=5))
def test_an_idle_session_is_never_probed_nor_deaf(config: LivenessConfig, end: float, closes: list[float]) -> None:
    trace = Trace((), tuple((t, t + 7) for t in sorted(closes)), end)
    assert run(trace, config, lambda _: False) == []


@settings(max_examples=200, deadline=None)
@given(
    config=configs,
    gaps=st.lists(st.floats(0.5, 1.0), min_size=1, max_size=400),
    probe_answers=st.booleans(),
)
def test_traffic_that_never_stops_longer_than_the_floor_is_never_deaf(
    config: LivenessConfig, gaps: list[float], probe_answers: bool
) -> None:
    scale = config.floor_seconds * 0.99  # every silence shorter than the floor
    times, now = [], 0.0
    for gap in gaps:
        now += gap * scale
        times.append(now)
    actions = run(Trace(tuple(times), end=now), config, lambda _: probe_answers)
    assert deaf_times(actions) == []
    assert [a for _, a in actions if a is Action.PROBE] == []


@settings(max_examples=200, deadline=None)
@given(
    config=configs,
    period=st.floats(1, 60),
    busy=st.integers(25, 200),
    probe_answers=st.booleans(),
)
def test_a_busy_session_that_goes_silent_is_found_deaf_in_bounded_time(
    config: LivenessConfig, period: float, busy: int, probe_answers: bool
) -> None:
    times = tuple(period * (k + 1) for k in range(busy))
    silent_from = times[-1]
    limit = max(config.floor_seconds, config.gap_factor * period)
    bound = limit + (config.confirm_seconds if probe_answers else 0) + 2 * TICK
    actions = run(Trace(times, end=silent_from + bound + 1), config, lambda _: probe_answers)
    found = deaf_times(actions)
    assert len(found) == 1, actions
    assert silent_from + limit - 1e-6 < found[0] <= silent_from + bound + 1e-6  # float sums: 1 µs either way


@settings(max_examples=150, deadline=None)
@given(
    base=configs,
    more_floor=st.floats(0, 1_000),
    more_factor=st.floats(0, 4),
    more_confirm=st.floats(0, 1_000),
    period=st.floats(1, 60),
    busy=st.integers(20, 100),
    probe_answers=st.booleans(),
    stops_answering=st.floats(0, 3_000),
)
def test_larger_thresholds_never_find_a_session_deaf_sooner(
    base: LivenessConfig,
    more_floor: float,
    more_factor: float,
    more_confirm: float,
    period: float,
    busy: int,
    probe_answers: bool,
    stops_answering: float,
) -> None:
    """With the probe's answer fixed, the verdict comes no sooner; whatever the probe answers, the suspicion (the
    first probe) comes no sooner. (A later probe may fail where an earlier one would have passed: with a socket
    that dies meanwhile, a larger threshold can give an earlier verdict, which is right.)"""
    larger = LivenessConfig(
        floor_seconds=base.floor_seconds + more_floor,
        gap_factor=base.gap_factor + more_factor,
        confirm_seconds=base.confirm_seconds + more_confirm,
        min_reports=base.min_reports,
        min_history_seconds=base.min_history_seconds,
    )
    times = tuple(period * (k + 1) for k in range(busy))
    trace = Trace(times, end=times[-1] + 12_000)
    first = deaf_times(run(trace, base, lambda _: probe_answers))
    later = deaf_times(run(trace, larger, lambda _: probe_answers))
    assert first, "the smaller thresholds find it"
    assert not later or later[0] >= first[0]

    def dies(now: float) -> bool:
        return now < times[-1] + stops_answering

    probes = [[t for t, a in run(trace, c, dies) if a is Action.PROBE] for c in (base, larger)]
    assert probes[0] and (not probes[1] or probes[1][0] >= probes[0][0])


def test_recovery_and_a_reconnect_restart_the_watch() -> None:
    config = LivenessConfig(floor_seconds=60, gap_factor=2, confirm_seconds=30, min_reports=3, min_history_seconds=0)
    state = on_connection(Liveness(), 0.0, True)
    for t in (1.0, 2.0, 3.0, 4.0):
        state, _ = on_activity(state, t, config)
    assert threshold(state, config, 5.0) == 60
    state, action = on_tick(state, 70.0, config)
    assert (action, state.status) == (Action.PROBE, Status.SUSPECT)
    state, action = on_probe(state, 70.0, True)
    assert action is Action.NONE
    state, action = on_tick(state, 100.0, config)
    assert (action, state.status) == (Action.DEAF, Status.DEAF)
    assert on_tick(state, 500.0, config)[1] is Action.NONE, "declared once per connection"
    state = on_connection(on_connection(state, 501.0, False), 502.0, True)  # restarted
    assert silence(state, 510.0) == 8.0
    state, action = on_tick(state, 563.0, config)
    assert action is Action.PROBE and state.status is Status.DEAF
    state, action = on_activity(state, 564.0, config)
    assert (action, state.status) == (Action.RECOVERED, Status.OK)
    assert on_probe(state, 565.0, False)[1] is Action.NONE, "a probe overtaken by traffic is moot"


def test_a_session_quiet_every_night_is_judged_after_a_day_and_its_nights_are_its_own() -> None:
    config = LivenessConfig(min_history_seconds=0)
    hour = 3600.0
    day_one = [k * 30.0 for k in range(int(8 * hour / 30))]  # busy 8 hours, then 12 hours of night
    day_two = [20 * hour + k * 30.0 for k in range(int(8 * hour / 30))]  # busy again, then night again
    actions = run(Trace((*day_one, *day_two), end=44 * hour), config, lambda _: True)
    assert [t for t, a in actions if a is Action.PROBE and t < 20 * hour], "no history of nights yet: suspect"
    assert [t for t, _ in actions if t > 28 * hour] == [], "the second night is within its own usual gaps"


def test_with_the_default_history_a_new_session_s_first_night_is_not_judged() -> None:
    hour = 3600.0
    day_one = [k * 30.0 for k in range(int(8 * hour / 30))]
    assert run(Trace(tuple(day_one), end=20 * hour), LivenessConfig(), lambda _: False) == []


def test_an_open_keeps_every_field_but_the_watch_it_restarts() -> None:
    """on_connection builds its state field by field (the hot path of a reconnect flood): every field that is not
    the watch's own (connected_since, probing, probe_ok_at, declared_at) is carried over, including any added
    later, as `_replace` would."""
    watch = {"connected_since", "probing", "probe_ok_at", "declared_at"}
    state = Liveness(
        last_inbound=10.0, connected_since=1.0, gaps=(3.0, 4.0), long_gaps=((5.0, 6.0),), first_inbound=2.0,
        reports=7, status=Status.DEAF, probing=True, probe_ok_at=8.0, declared_at=9.0,
    )  # fmt: skip
    defaults = Liveness()
    assert all(getattr(state, name) != getattr(defaults, name) for name in Liveness._fields)  # every field set
    opened = on_connection(state, 20.0, True)
    assert opened == state._replace(connected_since=20.0, probing=False, probe_ok_at=None, declared_at=None)
    assert {name for name in Liveness._fields if getattr(opened, name) != getattr(state, name)} == watch
