"""The event engine: takes validated events, asks the pure rules for a decision, and starts its effects.

Decisions are taken synchronously (no await between reading a session's state and writing the next one), so
concurrent events for one session can never start two closes. Effects that talk to the messenger runtime run
in tracked background tasks (heal.py, close.py), so an event handler never waits on the runtime that sent it.

About 410 lines: a quarter is the constructor wiring the runtime's parts; the handlers and decide-and-apply stay
together because the invariant above (no await between reading and writing a session's state) is theirs, and is
easier to keep when it is read in one place. Carrying decisions out is effects.py; fleet mode is fleet.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span

from sidecar.ports import FleetState, LivenessSockets, SessionStore, SocketController, StepQueue
from sidecar.rules.app_state import collection_label
from sidecar.rules.classification import ErrorClass, ErrorSource
from sidecar.rules.inputs import checked_connection, peer_user, phone_ref
from sidecar.rules.liveness import DeafAction, LivenessConfig
from sidecar.rules.policy import (
    BadDecrypt,
    BadMac,
    Close,
    ConnectionClosed,
    ConnectionOpened,
    Counters,
    ErrorStats,
    Event,
    HealthPolicy,
    Hold,
    OperatorClose,
    Phase,
    PolicyConfig,
    SessionState,
    decide,
    error_stats,
    windowed,
)
from sidecar.rules.records import (
    CloseTrigger,
    CounterKind,
    IncrementCounter,
    Notification,
    PhoneRef,
    ResetCounters,
)
from sidecar.rules.safety import Mode
from sidecar.runtime.close import CloseSequence
from sidecar.runtime.effects import Effects
from sidecar.runtime.errors import UnknownSession
from sidecar.runtime.fleet import FleetDecisions
from sidecar.runtime.fleet_safety import Incidents, Safety, SafetyView, needs_admission
from sidecar.runtime.heal import HealRunner
from sidecar.runtime.liveness import LivenessWatch
from sidecar.runtime.notices import Notices
from sidecar.runtime.observer import IsolatedObservers, RuntimeObserver
from sidecar.runtime.operator import OperatorControls
from sidecar.runtime.outcomes import span_ids
from sidecar.runtime.registry import MemorySessionRegistry, Session, SessionRegistry, SessionView
from sidecar.runtime.tally import Classifier, ErrorTally
from sidecar.runtime.tasks import BackgroundTasks
from sidecar.runtime.waiting import EventJournal, Traced

ZERO_COUNTERS = SessionState().counters


class SessionRuntime:
    def __init__(
        self,
        policy: PolicyConfig,
        store: SessionStore,
        steps: StepQueue,
        sockets: SocketController,
        observers: Sequence[RuntimeObserver] = (),
        *,
        clock: Callable[[], datetime],
        socket_end_timeout: float = 5.0,
        database_step_timeout: float = 5.0,
        tracer: trace.Tracer | None = None,
        notifications: bool = False,
        safety: Safety | None = None,
        registry: SessionRegistry | None = None,
        fleet: FleetState | None = None,
        backlog_limit: int = 100_000,
        events_journal: EventJournal | None = None,
        on_failure: Callable[[str, str], None] | None = None,
        state_ttl: float = 86_400.0,
        liveness: LivenessConfig | None = None,
        deaf_action: DeafAction = DeafAction.NONE,
        liveness_sockets: LivenessSockets | None = None,
    ) -> None:
        """`fleet`: fleet mode, decisions taken in PostgreSQL and shared by every replica (runtime/fleet.py).
        `on_failure(what, name)`: an observer ("observer", its class) or a background effect ("task",
        "effects") raised; it was logged and isolated."""
        self.policy = policy
        self._state_ttl = state_ttl
        self._safety = safety or Safety()
        self._store = store
        self._steps = steps
        report = on_failure or (lambda what, name: None)
        self._observers: list[RuntimeObserver] = [IsolatedObservers(observers, lambda name: report("observer", name))]
        self._clock = clock
        self._tracer = tracer or trace.NoOpTracerProvider().get_tracer("whatsapp-session-sidecar")
        self._traced = not isinstance(self._tracer, trace.NoOpTracer)
        self._registry: SessionRegistry = registry or MemorySessionRegistry()
        self._classify = Classifier()
        self._tasks = BackgroundTasks(lambda: report("task", "effects"))
        self._notices = Notices(notifications, clock, self._observers, steps)
        timeouts = {"socket_timeout": socket_end_timeout, "database_timeout": database_step_timeout}
        observing = self._safety.observing
        self._heals = HealRunner(steps, sockets, self._observers, self._tasks, self._tracer, observing, **timeouts)
        self._closes = CloseSequence(
            policy, self._registry, steps, sockets, self._observers, self._notices, self._tasks, self._tracer,
            clock, observing, self._safety.loops, **timeouts,
        )  # fmt: skip
        self._incidents = Incidents(
            self._safety, self._registry, self._notices, sockets, self._tasks, self._stats_of,
            socket_timeout=socket_end_timeout,
        )  # fmt: skip
        now = lambda: self._clock().timestamp()  # noqa: E731
        self.liveness = LivenessWatch(
            liveness or LivenessConfig(), deaf_action, liveness_sockets, self._safety, self._incidents, self._tasks,
            now, lambda: self._registry.session_count, self.is_closed, socket_timeout=socket_end_timeout,
        )  # fmt: skip
        if fleet is not None:
            self._closes.release_claim = fleet.release_close
        self._effects = Effects(
            policy, self._observers, self._notices, self._heals, self._closes, self._incidents,
            lambda: self.operator.fleet_breaker_status(),
        )  # fmt: skip
        self._fleet = (
            FleetDecisions(
                fleet, self._effects, policy, self._registry, self._closes, self._incidents, self._safety, now,
                backlog_limit=backlog_limit, journal=events_journal,
            )
            if fleet is not None
            else None
        )  # fmt: skip
        self.operator = OperatorControls(
            self._registry, self._closes, self._safety, self._incidents, store, self._tracer, now,
            self._operator_close, self._fleet,
        )  # fmt: skip
        self.force_close_session = self.operator.force_close_session

    def safety_view(self) -> SafetyView:
        return self.operator.safety_view()

    @property
    def mode(self) -> tuple[Mode, frozenset[int]]:
        """The mode and the observed organizations in force here (cheap: no breaker status, no held count)."""
        return self._safety.mode, self._safety.observe_organizations

    @property
    def breaker_tripped(self) -> bool:
        """The fleet's breaker as last read in fleet mode, else this process's."""
        return self._fleet.breaker_tripped if self._fleet is not None else self._safety.breaker.tripped

    # Queries (read-only views) ------------------------------------------------------------------------

    def sessions(self) -> Iterator[SessionView]:
        return self._registry.sessions()

    def session(self, organization_phone_id: int) -> SessionView | None:
        return self._registry.get(organization_phone_id)

    def is_closed(self, organization_phone_id: int) -> bool:
        return self._registry.is_closed(organization_phone_id)

    @property
    def session_count(self) -> int:
        return self._registry.session_count

    @property
    def closed_count(self) -> int:
        return self._registry.closed_count

    @property
    def held_count(self) -> int:
        return self._registry.held_count

    @property
    def background_tasks(self) -> int:
        return len(self._tasks)

    def get_session_error_stats(self, organization_phone_id: int) -> ErrorStats:
        session = self._registry.get(organization_phone_id)
        if session is not None:
            return error_stats(self._current_counters(session), self.policy.limits)
        if self.is_closed(organization_phone_id):
            return error_stats(ZERO_COUNTERS, self.policy.limits)
        raise UnknownSession(organization_phone_id)

    def counters_now(self, view: SessionView) -> Counters:
        """What /metrics and /v1/sessions show: under the windowed policy, only errors still in the window."""
        return self._current_counters(view) if isinstance(view, Session) else view.counters

    def _current_counters(self, session: Session) -> Counters:
        """The counters now: the windowed policy forgets errors that left the window since the last event."""
        if self.policy.health is HealthPolicy.WINDOWED:
            return windowed(session.state, None, self.policy.window_seconds, self._clock().timestamp()).counters
        return session.state.counters

    def _stats_of(self, phone: PhoneRef) -> ErrorStats:
        session = self._registry.get(phone.organization_phone_id)
        counters = self._current_counters(session) if session is not None else ZERO_COUNTERS
        return error_stats(counters, self.policy.limits)

    # Restart, background effects ----------------------------------------------------------------------

    @property
    def fleet(self) -> FleetDecisions | None:
        return self._fleet

    def batch(self) -> AbstractAsyncContextManager[None]:
        """Wrap the events of one frame or body: in fleet mode they are decided together (one transaction per
        batch instead of one per event); on one replica this changes nothing."""
        return self._fleet.batch() if self._fleet is not None else nullcontext()

    async def session_error_stats(self, organization_phone_id: int) -> ErrorStats:
        """getSessionErrorStats as the fleet sees it (the database's counters); one replica: the local ones."""
        if self._fleet is not None:
            return await self._fleet.session_error_stats(organization_phone_id)
        return self.get_session_error_stats(organization_phone_id)

    async def restore(self) -> int:
        """Continue from the counters the store kept (a restart loses no count). In fleet mode every decision
        reads the database; this only fills the read cache (stats, sessions, metrics) of this replica."""
        stored = await self._store.load_sessions(closed_within=self._state_ttl)
        if self._fleet is not None:
            self._registry.warm(stored)
            return len(stored)
        self._registry.restore(stored)
        return len(stored)

    def expire_state(self) -> list[PhoneRef]:
        """Bounded memory: forget sessions that hold nothing and markers older than the state TTL, and the loop
        detector's quiet phones. Returns the sessions forgotten."""
        now = self._clock().timestamp()
        forgotten = self._registry.sweep(now, self._state_ttl)
        for phone in forgotten:
            self.liveness.forget(phone.organization_phone_id)
            for observer in self._observers:
                observer.forgotten(phone)
        self._safety.loops.expire(now)
        self.liveness.expire(now, self._state_ttl)
        return forgotten

    async def settle(self) -> None:
        """Wait for every background effect started so far (tests, shutdown)."""
        await self._tasks.settle()

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Let running closes finish (bounded), then cancel what is left."""
        await self._tasks.shutdown(grace_seconds)

    # Events -------------------------------------------------------------------------------------------

    async def handle_decrypt_error(
        self,
        organization_id: int,
        organization_phone_id: int,
        phone_jid: str,
        error: str,
        source: ErrorSource | None = None,
        peer_jid: str | None = None,
        trace_context: Context | None = None,
        collection: str | None = None,
    ) -> ErrorClass:
        """Classify a raw decryption error and apply it; returns its class."""
        classified = self._classify(error, source)
        phone = phone_ref(organization_id, organization_phone_id, phone_jid)
        if classified.app_state is not None:
            for observer in self._observers:
                observer.app_state_failure(phone, collection_label(collection), classified.app_state)
        await self._decrypt_error(phone, classified.error_class, peer_user(peer_jid), trace_context)
        return classified.error_class

    def error_tally(self) -> ErrorTally | None:
        """A tally for one batch's counted-only errors (runtime/tally.py); None when each error must be applied
        on its own (a tracing exporter is configured: every error gets its span)."""
        if self._traced:
            return None
        return ErrorTally(self._classify, self._observers, self._registry, lambda: self._clock().timestamp())

    async def handle_bad_mac_error(
        self, organization_id: int, organization_phone_id: int, phone_jid: str, peer_jid: str | None = None
    ) -> bool:
        """The seed's handleBadMacError: True while the session continues, False once it is being closed."""
        phone = phone_ref(organization_id, organization_phone_id, phone_jid)
        return await self._decrypt_error(phone, ErrorClass.BAD_MAC, peer_user(peer_jid), None)

    async def handle_bad_decrypt_error(self, organization_id: int, organization_phone_id: int, phone_jid: str) -> bool:
        """The seed's handleBadDecryptError: True while the session continues, False once it is being closed."""
        phone = phone_ref(organization_id, organization_phone_id, phone_jid)
        return await self._decrypt_error(phone, ErrorClass.BAD_DECRYPT, None, None)

    async def _decrypt_error(
        self, phone: PhoneRef, error_class: ErrorClass, peer_user: str | None, trace_context: Context | None
    ) -> bool:
        if self._fleet is not None and self._traced:
            return await self._fleet_decrypt_error(phone, error_class, peer_user, trace_context)
        # Without an exporter the tracer is a no-op; skipping even its context handling keeps ingest cheap.
        span_scope = (
            self._tracer.start_as_current_span("session.decrypt_error", context=trace_context)
            if self._traced
            else nullcontext(INVALID_SPAN)
        )
        with span_scope as span:
            continues = await self._count_error(phone, error_class, peer_user, None)
            self._describe_decrypt_span(span, phone, error_class, continues)
            return continues

    async def _count_error(
        self, phone: PhoneRef, error_class: ErrorClass, peer_user: str | None, traced: Traced | None
    ) -> bool:
        """Observers, then the counted classes decided; `traced` (fleet mode) is told once the decision is carried
        out, which for a counted-only class is at once."""
        for observer in self._observers:
            observer.decrypt_error(phone, error_class)
        now = self._clock().timestamp()
        if error_class is ErrorClass.BAD_MAC:
            return (await self._apply(phone, BadMac(peer_user, now), CounterKind.BAD_MAC, now, traced))[0]
        if error_class is ErrorClass.BAD_DECRYPT:
            return (await self._apply(phone, BadDecrypt(now), CounterKind.BAD_DECRYPT, now, traced))[0]
        if not self.is_closed(phone.organization_phone_id):
            # Counted-only classes change no counter, but the session is now known and has a last error.
            self._registry.ensure(phone).last_error_at = now
        if traced is not None:
            traced.decided(True)
        return True

    def _describe_decrypt_span(self, span: Span, phone: PhoneRef, error_class: ErrorClass, continues: bool) -> None:
        if not span.is_recording():
            return
        session = self._registry.get(phone.organization_phone_id)
        counters = session.state.counters if session is not None else ZERO_COUNTERS
        after = counters.bad_decrypt_errors if error_class is ErrorClass.BAD_DECRYPT else counters.bad_mac_errors
        span.set_attributes(
            {
                **span_ids(phone),
                "whatsapp.error.class": str(error_class),
                "whatsapp.counter.after": after,
                "whatsapp.session.continues": continues,
            }
        )

    async def _fleet_decrypt_error(
        self, phone: PhoneRef, error_class: ErrorClass, peer_user: str | None, trace_context: Context | None
    ) -> bool:
        """Fleet mode decides at the end of a batch: the span stays open until its decision is carried out."""
        span = self._tracer.start_span("session.decrypt_error", context=trace_context)
        context = trace.set_span_in_context(span, trace_context)

        def decided(continues: bool) -> None:
            self._describe_decrypt_span(span, phone, error_class, continues)
            span.end()

        token = otel_context.attach(context)
        try:
            return await self._count_error(phone, error_class, peer_user, Traced(context, decided))
        finally:
            otel_context.detach(token)

    async def on_connection_update(
        self,
        organization_id: int,
        organization_phone_id: int,
        phone_jid: str,
        connection: str,
        status_code: int | None = None,
        new_login: bool = False,
    ) -> None:
        """`new_login`: the runtime paired this phone anew (a QR scan) since it last closed."""
        checked_connection(connection)
        phone = phone_ref(organization_id, organization_phone_id, phone_jid)
        now = self._clock().timestamp()
        if connection != "connecting":
            self.liveness.connection(phone, connection == "open")
        if connection == "open" and self._fleet is not None:
            await self._fleet.open(phone, now, new_login)
        elif connection == "open":
            closed = self._incidents.reconnected_after_logout(organization_phone_id, now, new_login)
            if closed is not None:
                logged_out = self._registry.logged_out(organization_phone_id)
                assert logged_out is not None
                await self._incidents.logout_did_not_stick(closed, now - logged_out.at)
                return
            reopened = self._registry.reopen(organization_phone_id)
            session = self._registry.ensure(phone)
            had_counts = session.state.counters != ZERO_COUNTERS
            self._effects.set_connected(session, True)
            _, recovered = await self._apply(phone, ConnectionOpened(), None)
            if had_counts or reopened or recovered:
                await self._steps.submit(ResetCounters(session.phone, recovered))
        elif connection == "close":
            known = self._registry.get(organization_phone_id)
            if known is not None:
                self._effects.set_connected(known, False)
            if self._fleet is None:  # fleet mode detects loops in the decision, on the shared history
                await self._incidents.connection_closed(phone, now, status_code)
            if self._fleet is not None or not self.is_closed(organization_phone_id):
                await self._apply(phone, ConnectionClosed(status_code), None)

    async def handle_activity(
        self, organization_id: int, organization_phone_id: int, phone_jid: str, last_inbound_at: datetime
    ) -> None:
        """The runtime's report of inbound traffic (rules/liveness.py): the session's baseline, and its recovery."""
        if self.is_closed(organization_phone_id):
            return
        phone = phone_ref(organization_id, organization_phone_id, phone_jid)
        self.liveness.activity(phone, last_inbound_at.timestamp())

    async def report_credentials_conflict(
        self, organization_id: int, organization_phone_id: int, phone_jid: str, detail: dict[str, Any]
    ) -> None:
        """Two runtime connections on different replicas claim one phone: two processes share its credentials."""
        phone = phone_ref(organization_id, organization_phone_id, phone_jid)
        await self._incidents.credentials_conflict(phone, detail)

    # Decide and apply ---------------------------------------------------------------------------------

    async def _apply(
        self,
        phone: PhoneRef,
        event: Event,
        counted: CounterKind | None,
        now: float | None = None,
        traced: Traced | None = None,
    ) -> tuple[bool, Notification | None]:
        """Decide, then persist the count with the health flip it caused, if any. In fleet mode the decision
        is taken inside the database transaction (fleet.py); here (one replica) it is taken synchronously.

        Returns whether the session continues (False once it is being closed) and that flip's notification.
        """
        if self._fleet is not None:
            return await self._fleet.apply(phone, event, counted, now, traced)
        if not isinstance(event, ConnectionOpened) and self.is_closed(phone.organization_phone_id):
            return False, None
        session = self._registry.ensure(phone)
        before = session.state
        if counted is not None:
            session.last_error_at = now if now is not None else self._clock().timestamp()
        trigger = CloseTrigger.AUTOMATIC if counted is not None else CloseTrigger.CONNECTION
        decision, flip, just_tripped = self._transition(session, event, trigger)
        if counted is not None and _count(session.state.counters, counted) > _count(before.counters, counted):
            await self._steps.submit(IncrementCounter(session.phone, counted, flip))
        await self._effects.after_decision(session.phone, decision, just_tripped)
        return not isinstance(decision, Close | Hold) and session.state.phase is Phase.ACTIVE, flip

    def _transition(
        self, session: Session, event: Event, trigger: CloseTrigger
    ) -> tuple[object, Notification | None, bool]:
        """The rules' decision for this event, its state written back, its effect started. Also returns the
        health flip's notification and whether the breaker tripped on this decision."""
        before = session.state
        transition = decide(before, event, self.policy)
        just_tripped = False
        if needs_admission(transition, trigger):
            admitted, just_tripped = self._safety.admit_automatic_close(
                self._clock().timestamp(), self._registry.session_count
            )
            if not admitted:
                transition = decide(before, event, self.policy, automatic_closes_allowed=False)
        flip = self._effects.health_flip(before, transition.state)
        self._effects.carry_out(session, before, transition, trigger, flip)
        return transition.decision, flip, just_tripped

    def _operator_close(self, session: Session, reason: str) -> None:
        self._transition(session, OperatorClose(reason), CloseTrigger.OPERATOR)


def _count(counters: Counters, kind: CounterKind) -> int:
    return counters.bad_mac_errors if kind is CounterKind.BAD_MAC else counters.bad_decrypt_errors
