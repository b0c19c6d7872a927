"""The event engine: takes session events (runtime link v1 structs), asks the decider (runtime/decider.py: this
process, or the fleet's database) for a decision, and lets observers and spans follow. Its parts are built whole
by runtime/assembly.py. Effects run in tracked background tasks (heal.py, close.py): a handler never waits on
the runtime that sent the event."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span

from sidecar.events.schema import (
    AccountRestriction,
    Activity,
    ConnectionUpdate,
    DecryptError,
    MessageRecovered,
    SessionEvent,
)
from sidecar.ports import SessionStore
from sidecar.rules.app_state import collection_label
from sidecar.rules.classification import ErrorClass
from sidecar.rules.inputs import checked_connection, peer_user, phone_ref
from sidecar.rules.loss import Deferred, Outcome
from sidecar.rules.policy import BadDecrypt, BadMac, Counters, ErrorStats, HealthPolicy, error_stats
from sidecar.rules.records import CounterKind, PhoneRef
from sidecar.rules.restrictions import Restriction
from sidecar.rules.safety import Mode
from sidecar.runtime.decider import Decider
from sidecar.runtime.effects import Effects
from sidecar.runtime.errors import UnknownSession
from sidecar.runtime.incidents import Incidents
from sidecar.runtime.liveness_watch import LivenessWatch
from sidecar.runtime.message_loss import MessageLoss
from sidecar.runtime.operator import CloseOutcome, checked_reason
from sidecar.runtime.outcomes import context_from_traceparent, span_ids
from sidecar.runtime.parts import ZERO_COUNTERS, RuntimeParts
from sidecar.runtime.registry import Session, SessionView
from sidecar.runtime.restrictions import Restrictions
from sidecar.runtime.tally import Classifier, ErrorTally
from sidecar.runtime.waiting import Traced


@dataclass(frozen=True, slots=True)
class Collaborators:
    """What the engine works with besides the shared parts (built by runtime/assembly.py)."""

    decider: Decider
    effects: Effects
    incidents: Incidents
    liveness: LivenessWatch
    store: SessionStore
    state_ttl: float
    restrictions: Restrictions
    losses: MessageLoss


class SessionRuntime:
    def __init__(self, parts: RuntimeParts, collaborators: Collaborators) -> None:
        self.policy = parts.policy
        self._parts = parts
        self._registry = parts.registry
        self._observers = parts.observers
        self._tracer = parts.tracer
        self._traced = not isinstance(parts.tracer, trace.NoOpTracer)
        self._classify = Classifier()
        self.decider = collaborators.decider
        self._effects = collaborators.effects
        self._incidents = collaborators.incidents
        self.liveness = collaborators.liveness
        self._store = collaborators.store
        self._state_ttl = collaborators.state_ttl
        self._restrictions = collaborators.restrictions
        self._losses = collaborators.losses

    @property
    def mode(self) -> tuple[Mode, frozenset[int]]:
        """The mode and the observed organizations in force here (cheap: no breaker status, no held count)."""
        return self._parts.safety.mode, self._parts.safety.observe_organizations

    @property
    def breaker_tripped(self) -> bool:
        return self.decider.breaker_tripped

    # Queries (read-only views) ------------------------------------------------------------------------

    def sessions(self) -> Iterator[SessionView]:
        return self._registry.sessions()

    def session(self, organization_phone_id: int) -> SessionView | None:
        return self._registry.get(organization_phone_id)

    def is_closed(self, organization_phone_id: int) -> bool:
        return self._registry.is_closed(organization_phone_id)

    def closed_phones(self) -> Iterator[PhoneRef]:
        """The phones this process knows the sidecar closed and logged out, not opened since."""
        return self._registry.closed_phones()

    def closed_phone(self, organization_phone_id: int) -> PhoneRef | None:
        return self._registry.closed_phone(organization_phone_id)

    def logged_out_at(self, organization_phone_id: int) -> float | None:
        logged_out = self._registry.logged_out(organization_phone_id)
        return None if logged_out is None else logged_out.at

    def take_touched(self) -> set[int]:
        """The sessions written with something to say since the last take (one reader: the scrape)."""
        return self._registry.take_touched()

    def connected_by_organization(self) -> Mapping[int, int]:
        return self._registry.connected_by_organization()

    def restricted(self) -> list[tuple[PhoneRef, Restriction]]:
        """Every restriction in force here (rules/restrictions.py), by session then kind."""
        return self._restrictions.restricted()

    def restrictions_of(self, organization_phone_id: int) -> list[Restriction]:
        return self._restrictions.of(organization_phone_id)

    async def expire_restrictions(self) -> int:
        """Lift the restrictions whose `until` has passed; returns how many."""
        return await self._restrictions.expire()

    def messages_lost(self, organization_phone_id: int) -> int:
        """The session's messages lost here (rules/loss.py): failed and not recovered within --loss-deadline."""
        return self._losses.lost(organization_phone_id)

    def messages_pending(self, organization_phone_id: int) -> int:
        """The session's failed messages this process still waits on: recovered, or lost at --loss-deadline."""
        return self._losses.pending(organization_phone_id)

    async def hand_over_losses(self) -> int:
        """Stopping: the failed messages not shared yet go to the loss ledger, for the replicas that stay."""
        return await self._losses.hand_over()

    @property
    def messages_unsettled(self) -> int:
        """Failures past their deadline waiting for the loss ledger (the store is away)."""
        return self._losses.unsettled

    def losing(self) -> list[tuple[PhoneRef, int]]:
        return self._losses.losing()

    async def expire_losses(self) -> int:
        """Count the failures whose --loss-deadline passed unrecovered as lost; returns how many. Under the
        loss-aware policy a lost message's Bad MAC counts toward the limit now (it was healed when it failed)."""
        lost = await self._losses.expire()
        for item in lost:
            if item.deferred is None:
                continue
            now = self._parts.now()
            phone = self._losses.phone(item.organization_phone_id)
            for observer in self._observers:
                observer.decrypt_error(phone, ErrorClass.BAD_MAC)
            late = BadMac(item.deferred.peer_user, now, late=True)
            await self.decider.apply(phone, late, CounterKind.BAD_MAC, now, None)
        return len(lost)

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
        return len(self._parts.tasks)

    def get_session_error_stats(self, organization_phone_id: int) -> ErrorStats:
        """getSessionErrorStats as this process knows it."""
        session = self._registry.get(organization_phone_id)
        if session is not None:
            return error_stats(self._parts.counters_now(session), self.policy.limits)
        if self.is_closed(organization_phone_id):
            return error_stats(ZERO_COUNTERS, self.policy.limits)
        raise UnknownSession(organization_phone_id)

    async def session_error_stats(self, organization_phone_id: int) -> ErrorStats:
        """getSessionErrorStats as the decider sees it (in fleet mode, the database's counters)."""
        return await self.decider.session_error_stats(organization_phone_id)

    def counters_now(self, view: SessionView) -> Counters:
        """What /metrics and /v1/sessions show: under the windowed policy, only errors still in the window."""
        return self._parts.counters_now(view) if isinstance(view, Session) else view.counters

    # Operators, restart, background effects -----------------------------------------------------------

    async def force_close_session(self, organization_phone_id: int, reason: str) -> CloseOutcome:
        """The seed's forceCloseSession: the same close, started by an operator. Waits for it to finish."""
        return await self.decider.force_close(organization_phone_id, checked_reason(reason))

    def batch(self, origin: tuple[str, int] | None = None) -> AbstractAsyncContextManager[None]:
        """Wrap the events of one frame or body (in fleet mode decided together, one transaction per batch)."""
        return self.decider.batch(origin)

    async def restore(self) -> int:
        """Continue from the counters the store kept (a restart loses no count)."""
        stored = await self._store.load_sessions(closed_within=self._state_ttl)
        self.decider.restore(stored)
        await self._restrictions.restore(self._store)
        return len(stored)

    def expire_state(self) -> list[PhoneRef]:
        """Bounded memory: forget sessions that hold nothing and markers older than the state TTL, and the loop
        detector's quiet phones. Returns the sessions forgotten."""
        now = self._parts.now()
        forgotten = self._registry.sweep(now, self._state_ttl)
        for phone in forgotten:
            self.liveness.forget(phone.organization_phone_id)
            self._restrictions.forget(phone.organization_phone_id)
            self._losses.forget(phone.organization_phone_id)
            for observer in self._observers:
                observer.forgotten(phone)
        self._parts.safety.loops.expire(now)
        self.liveness.expire(now, self._state_ttl)
        return forgotten

    async def settle(self) -> None:
        """Wait for every background effect started so far (tests, shutdown)."""
        await self._parts.tasks.settle()

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Let running closes finish (bounded), then cancel what is left."""
        await self._parts.tasks.shutdown(grace_seconds)

    # Events -------------------------------------------------------------------------------------------

    async def apply(self, event: SessionEvent) -> ErrorClass | None:
        """One session event of the runtime link, validated or not (a direct caller's is checked here: InvalidInput
        names its bad field). Returns the class a decrypt error was classified as."""
        if type(event) is DecryptError:
            return await self._on_decrypt_error(event)
        if type(event) is ConnectionUpdate:
            await self._on_connection_update(event)
        elif type(event) is AccountRestriction:
            await self._restrictions.report(event)
        elif type(event) is MessageRecovered:
            self._losses.recovered(event)
        else:
            assert isinstance(event, Activity)
            self._on_activity(event)
        return None

    def error_class(self, event: DecryptError) -> ErrorClass:
        """What the rules make of a decrypt error's text (remembered: error texts repeat)."""
        return self._classify(event.error, event.source).error_class

    def error_tally(self) -> ErrorTally | None:
        """A tally for one batch's counted-only errors and opens that decide nothing (runtime/tally.py); None
        when each event must be applied on its own (a tracing exporter is configured: every error gets its span)."""
        if self._traced:
            return None
        return ErrorTally(
            self._classify, self._observers, self._registry, self._parts.now, self.decider.steady, self.liveness,
            self._losses.track_batch,
        )  # fmt: skip

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

    async def report_credentials_conflict(
        self, organization_id: int, organization_phone_id: int, phone_jid: str, detail: dict[str, Any]
    ) -> None:
        """Two runtime connections on different replicas claim one phone: two processes share its credentials."""
        phone = phone_ref(organization_id, organization_phone_id, phone_jid)
        await self._incidents.credentials_conflict(phone, detail)

    async def _on_decrypt_error(self, event: DecryptError) -> ErrorClass:
        """Classify a raw decryption error and apply it."""
        classified = self._classify(event.error, event.source)
        phone = phone_ref(event.organization_id, event.organization_phone_id, event.phone_jid)
        pending = False
        if event.message_id is not None:
            # loss-aware: a Bad MAC whose message may still be recovered is healed now and counted only if lost
            loss_aware = self.policy.health is HealthPolicy.LOSS_AWARE and classified.error_class is ErrorClass.BAD_MAC
            deferred = Deferred(peer_user(event.peer_jid)) if loss_aware else None
            outcome = self._losses.failed(event, deferred)
            pending = deferred is not None and outcome in (Outcome.PENDING, Outcome.REPEATED)
        if classified.app_state is not None:
            for observer in self._observers:
                observer.app_state_failure(phone, collection_label(event.collection), classified.app_state)
        context = context_from_traceparent(event.traceparent)
        await self._decrypt_error(phone, classified.error_class, peer_user(event.peer_jid), context, pending=pending)
        return classified.error_class

    async def _decrypt_error(
        self,
        phone: PhoneRef,
        error_class: ErrorClass,
        peer_user: str | None,
        trace_context: Context | None,
        *,
        pending: bool = False,
    ) -> bool:
        if self.decider.decides_later and self._traced:
            return await self._decrypt_error_decided_later(phone, error_class, peer_user, trace_context, pending)
        # Without an exporter the tracer is a no-op; skipping even its context handling keeps ingest cheap.
        span_scope = (
            self._tracer.start_as_current_span("session.decrypt_error", context=trace_context)
            if self._traced
            else nullcontext(INVALID_SPAN)
        )
        with span_scope as span:
            continues = await self._count_error(phone, error_class, peer_user, None, pending)
            self._describe_decrypt_span(span, phone, error_class, continues)
            return continues

    async def _decrypt_error_decided_later(
        self,
        phone: PhoneRef,
        error_class: ErrorClass,
        peer_user: str | None,
        trace_context: Context | None,
        pending: bool,
    ) -> bool:
        """The decision comes at the end of the batch: the span stays open until it is carried out."""
        span = self._tracer.start_span("session.decrypt_error", context=trace_context)
        context = trace.set_span_in_context(span, trace_context)

        def decided(continues: bool) -> None:
            self._describe_decrypt_span(span, phone, error_class, continues)
            span.end()

        token = otel_context.attach(context)
        try:
            return await self._count_error(phone, error_class, peer_user, Traced(context, decided), pending)
        finally:
            otel_context.detach(token)

    async def _count_error(
        self,
        phone: PhoneRef,
        error_class: ErrorClass,
        peer_user: str | None,
        traced: Traced | None,
        pending: bool = False,
    ) -> bool:
        """Observers, then the counted classes decided; `traced` is told once the decision is carried out,
        which for a counted-only class is at once."""
        for observer in self._observers:
            observer.decrypt_error(phone, error_class)
        now = self._parts.now()
        if error_class is ErrorClass.BAD_MAC:
            event = BadMac(peer_user, now, pending=pending)
            return (await self.decider.apply(phone, event, CounterKind.BAD_MAC, now, traced))[0]
        if error_class is ErrorClass.BAD_DECRYPT:
            return (await self.decider.apply(phone, BadDecrypt(now), CounterKind.BAD_DECRYPT, now, traced))[0]
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

    async def _on_connection_update(self, event: ConnectionUpdate) -> None:
        """An `open` with `new_login`: the runtime paired this phone anew (a QR scan) since it last closed."""
        connection = checked_connection(event.connection)
        phone = phone_ref(event.organization_id, event.organization_phone_id, event.phone_jid)
        now = self._parts.now()
        if connection != "connecting":
            self.liveness.connection(phone, connection == "open", now)
        if connection == "open":
            await self.decider.opened(phone, now, event.new_login)
            await self._restrictions.connection_opened(phone)
        elif connection == "close":
            known = self._registry.get(event.organization_phone_id)
            if known is not None:
                self._effects.set_connected(known, False)
            await self.decider.closed(phone, now, event.status_code)

    def _on_activity(self, event: Activity) -> None:
        """The runtime's report of inbound traffic (rules/liveness.py): the session's baseline, and its recovery."""
        if self.is_closed(event.organization_phone_id):
            return
        if event.last_inbound_at is None:  # only says where the session is (claimed by the link)
            return
        phone = phone_ref(event.organization_id, event.organization_phone_id, event.phone_jid)
        self.liveness.activity(phone, event.last_inbound_at.timestamp())
