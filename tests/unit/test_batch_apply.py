"""A batch applied as a batch (errors and opens that change no decision tallied, events/intake.py and
runtime/tally.py) ends in exactly the state that applying its events one by one reaches: sessions, their liveness
watches, closes, heals, the store, and the metrics as the stock Prometheus parser reads them. The oracle is the
one-by-one path (`SessionRuntime.apply`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.events.intake import Admission, Channel, Intake
from sidecar.events.schema import ConnectionUpdate, DecryptError, SessionEvent
from sidecar.rules.classification import ErrorSource
from sidecar.rules.liveness import Liveness
from sidecar.rules.policy import Counters, PolicyConfig
from sidecar.telemetry.metrics import MetricsObserver, SidecarMetrics
from tests.harness import Harness, runtime_over

PHONES = (1, 2, 3)
FIXED = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)

# (error text, source, collection): counted-only classes, and the two that count.
ERRORS = {
    "no_session": ("No session record", ErrorSource.MESSAGE, None),
    "media": ("Bad MAC", ErrorSource.MEDIA, None),
    "snapshot": ("LTHash verification failed on snapshot", ErrorSource.APP_STATE, "regular"),
    "gave_up": ("failed to sync regular_low from v12, giving up", ErrorSource.APP_STATE, "regular_low"),
    "other": ("something else went wrong", None, None),
    "bad_mac": ("Bad MAC", ErrorSource.MESSAGE, None),
    "bad_decrypt": ("Invalid patch mac", ErrorSource.APP_STATE, "critical_block"),
}
KINDS = (*ERRORS, "open", "close", "login")  # login: an open after a new QR scan (reopens a logged-out phone)


def event(kind: str, phone: int) -> SessionEvent:
    jid = f"7900000000{phone}@s.whatsapp.net"
    if kind == "login":
        return ConnectionUpdate(organization_id=7, organization_phone_id=phone, phone_jid=jid, connection="open",
                                new_login=True)  # fmt: skip
    if kind in ("open", "close"):
        return ConnectionUpdate(organization_id=7, organization_phone_id=phone, phone_jid=jid,
                                connection=kind, status_code=428 if kind == "close" else None)  # type: ignore[arg-type]  # fmt: skip
    error, source, collection = ERRORS[kind]
    peer = "79111111111@s.whatsapp.net" if kind == "bad_mac" else None
    return DecryptError(organization_id=7, organization_phone_id=phone, phone_jid=jid, error=error, source=source,
                        peer_jid=peer, collection=collection)  # fmt: skip


def metric_samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counters the runtime feeds, read back by the stock parser."""
    names = ("whatsapp_decrypt_errors", "whatsapp_app_state_sync_failures", "whatsapp_session_closes",
             "whatsapp_session_heals")  # fmt: skip
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name in names:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def outcome(events: list[SessionEvent], batched: bool, prelude: list[SessionEvent]) -> dict[str, object]:
    """`prelude`: applied one by one and carried out before the batch (closes finished, phones logged out)."""
    registry = CollectorRegistry()
    metrics = SidecarMetrics(registry, PolicyConfig().limits)
    async with runtime_over(None, observers=[MetricsObserver(metrics)], clock=lambda: FIXED) as harness:
        sockets = {phone: harness.socket(phone) for phone in PHONES}
        for item in prelude:
            await harness.runtime.apply(item)
        await harness.runtime.settle()
        if batched:
            assert harness.runtime.error_tally() is not None  # no exporter: the batch path is the one under test
            pending = harness.pending
            intake = Intake(harness.runtime, lambda ack: None, Admission(pending.caught_up, lambda: pending.room),
                            metrics)  # fmt: skip
            await intake.take(events, Channel.LOGS)
        else:
            for item in events:
                await harness.runtime.apply(item)
        await harness.runtime.settle()
        await harness.pending.caught_up()
        return {
            "sessions": sessions_of(harness),
            "stored": sorted(
                (s.phone.organization_phone_id, s.counters.bad_mac_errors, s.counters.bad_decrypt_errors, s.closed)
                for s in await harness.store.load_sessions(closed_within=86_400)
            ),
            "sockets": {phone: (s.ended, s.cleared) for phone, s in sockets.items()},
            "metrics": metric_samples(registry),
        }


def sessions_of(harness: Harness) -> dict[int, object]:
    state: dict[int, object] = {}
    for phone in PHONES:
        session = harness.runtime.session(phone)
        known = None
        if session is not None:
            known = (session.counters, session.phase, session.connected, session.last_error_at)
        state[phone] = (harness.runtime.is_closed(phone), known, harness.runtime.liveness.state_of(phone))
    return state


batches = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(PHONES)), min_size=1, max_size=40)
# Before the batch: some phones closed (three Bad MACs) and logged out, some with counts, some unknown.
prelude_kinds = st.sampled_from(("bad_mac", "bad_decrypt", "no_session", "open"))
preludes = st.tuples(
    st.sets(st.sampled_from(PHONES)), st.lists(st.tuples(prelude_kinds, st.sampled_from(PHONES)), max_size=6)
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches, preludes)
def test_a_batch_ends_where_its_events_one_by_one_end(
    items: list[tuple[str, int]], before: tuple[set[int], list[tuple[str, int]]]
) -> None:
    closed, others = before
    prelude = [event("bad_mac", phone) for phone in sorted(closed) for _ in range(3)]
    prelude += [event(kind, phone) for kind, phone in others]
    events = [event(kind, phone) for kind, phone in items]
    one_by_one = asyncio.run(outcome(events, batched=False, prelude=prelude))
    batched = asyncio.run(outcome(events, batched=True, prelude=prelude))
    assert batched == one_by_one


def test_a_storm_of_counted_only_errors_is_counted_in_full() -> None:
    """The totals reach the metrics: 1,000 errors over three phones in one batch, read by the stock parser."""
    events = [event(("no_session", "snapshot", "media")[index % 3], PHONES[index % 3]) for index in range(1000)]
    samples = asyncio.run(outcome(events, batched=True, prelude=[]))["metrics"]
    assert isinstance(samples, dict)
    by_kind = {
        dict(labels)["kind"]: value
        for (name, labels), value in samples.items()
        if name == "whatsapp_decrypt_errors_total" and value
    }
    assert by_kind == {"no_session": 334, "app_state_sync": 333, "media": 333}
    snapshots = [v for (name, labels), v in samples.items() if name == "whatsapp_app_state_sync_failures_total" and v]
    assert snapshots == [333]


def test_an_open_of_a_steady_session_in_a_batch_restarts_its_watch() -> None:
    """A reconnect flood's opens are tallied (nothing to decide), yet each restarts the session's liveness watch at
    the batch's time, as the engine does one by one; an open after a count is decided (it resets the counters)."""
    times = [FIXED]

    async def scenario() -> tuple[tuple[object, object], list[Liveness | None], Counters]:
        registry = CollectorRegistry()
        metrics = SidecarMetrics(registry, PolicyConfig().limits)
        async with runtime_over(None, observers=[MetricsObserver(metrics)], clock=lambda: times[-1]) as harness:
            harness.socket(1), harness.socket(2)
            for phone in (1, 2):
                await harness.runtime.apply(event("open", phone))
            await harness.runtime.apply(event("bad_mac", 2))
            await harness.runtime.settle()
            steady = harness.runtime.decider.steady(1), harness.runtime.decider.steady(2)
            times.append(datetime(2026, 11, 30, 9, 5, tzinfo=UTC))
            pending = harness.pending
            intake = Intake(harness.runtime, lambda ack: None, Admission(pending.caught_up, lambda: pending.room),
                            metrics)  # fmt: skip
            await intake.take([event("open", 1), event("no_session", 1), event("open", 2)], Channel.LOGS)
            await harness.runtime.settle()
            watches = [harness.runtime.liveness.state_of(phone) for phone in (1, 2)]
            counters = harness.runtime.session(2).counters  # type: ignore[union-attr]
            return steady, watches, counters

    (steady_1, steady_2), watches, counters = asyncio.run(scenario())
    assert steady_1 is not None and steady_2 is None  # phone 2 has a count: its open is decided
    assert [watch.connected_since if watch else None for watch in watches] == [times[-1].timestamp()] * 2
    assert counters.bad_mac_errors == 0
