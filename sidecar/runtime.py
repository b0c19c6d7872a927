"""The session runtime: feeds events to the policy and carries its decisions out through the ports.

Decisions are taken synchronously (no await between reading a session's state and writing the next one), so
concurrent events for one session can never start two closes. Effects that talk to the messenger runtime run
in tracked background tasks, so an event handler never waits on the runtime that sent the event.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode

from sidecar.classification import ErrorClass, ErrorSource, classify
from sidecar.jid import parse_jid
from sidecar.observers import RuntimeObserver
from sidecar.pending import PendingSteps
from sidecar.policy import (
    CRYPTO_LIMIT_REASONS,
    BadDecrypt,
    BadMac,
    Close,
    CloseCompleted,
    ConnectionClosed,
    ConnectionOpened,
    Counters,
    ErrorStats,
    Event,
    Heal,
    HealthPolicy,
    Hold,
    KeyScope,
    OperatorClose,
    Phase,
    PolicyConfig,
    SessionState,
    decide,
    error_stats,
    is_healthy,
    windowed,
)
from sidecar.ports import SessionStore, SocketCommandFailed, SocketController, SocketUnreachable
from sidecar.records import (
    CloseTrigger,
    ClosureRecord,
    CounterKind,
    DeleteKeys,
    IncrementCounter,
    Logout,
    LogoutResult,
    Notification,
    NotificationEvent,
    PhoneRef,
    RecordDecision,
    ResetCounters,
    StepOutcome,
)
from sidecar.safety import Breaker, BreakerConfig, IncidentKind, LoopDetector, Mode, is_reconnect_after_logout

DATABASE_PARTS = ("authKeys", "phoneStatus", "closureRecord", "counters")
DATABASE_SPANS = {
    "authKeys": "auth.delete_keys",
    "phoneStatus": "phone.mark_logged_out",
    "closureRecord": "closure.record",
}


class UnknownSession(LookupError):
    def __init__(self, organization_phone_id: int) -> None:
        super().__init__(f"no session with organizationPhoneId {organization_phone_id}")
        self.organization_phone_id = organization_phone_id


class InvalidInput(ValueError):
    """Bad input from a caller; `field` names what was wrong. Nothing was changed."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(slots=True)
class Session:
    phone: PhoneRef
    state: SessionState
    connected: bool = False
    last_error_at: float | None = None  # epoch seconds
    close_task: asyncio.Task[ClosureRecord] | None = None
    # At most one heal in flight per session; heals decided meanwhile merge here, per scope, into the next one.
    heal_task: asyncio.Task[None] | None = None
    queued_heals: dict[KeyScope, tuple[str, ...]] = field(default_factory=dict)

    @property
    def organization_phone_id(self) -> int:
        return self.phone.organization_phone_id


@dataclass(frozen=True, slots=True)
class CloseOutcome:
    record: ClosureRecord | None
    already_closed: bool


CONNECTION_STATES = ("connecting", "open", "close")

INCIDENT_EVENTS = {
    IncidentKind.RECONNECTED_AFTER_LOGOUT: NotificationEvent.RECONNECTED_AFTER_LOGOUT,
    IncidentKind.RECONNECT_LOOP: NotificationEvent.RECONNECT_LOOP,
    IncidentKind.CREDENTIALS_CONFLICT: NotificationEvent.CREDENTIALS_CONFLICT,
}


@dataclass
class Safety:
    """The fleet safety state the runtime consults; operators change it through the API without a restart."""

    breaker: Breaker = field(default_factory=lambda: Breaker(BreakerConfig()))
    loops: LoopDetector = field(default_factory=LoopDetector)
    mode: Mode = Mode.ENFORCE
    observe_organizations: frozenset[int] = frozenset()
    logout_stick_seconds: float = 3600.0

    def observing(self, organization_id: int) -> bool:
        return self.mode is Mode.OBSERVE or organization_id in self.observe_organizations


@dataclass(frozen=True, slots=True)
class LoggedOut:
    """When the sidecar logged a phone out, and whether only in observe mode (nothing was really ended)."""

    at: float
    observed: bool


class SessionRuntime:
    def __init__(
        self,
        policy: PolicyConfig,
        store: SessionStore,
        pending: PendingSteps,
        sockets: SocketController,
        observers: Sequence[RuntimeObserver] = (),
        *,
        clock: Callable[[], datetime],
        socket_end_timeout: float = 5.0,
        database_step_timeout: float = 5.0,
        tracer: trace.Tracer | None = None,
        notifications: bool = False,
        safety: Safety | None = None,
    ) -> None:
        self._notifications = notifications
        self.safety = safety or Safety()
        self._logged_out: dict[int, LoggedOut] = {}
        self._breaker_just_tripped = False
        self.policy = policy
        self._tracer = tracer or trace.NoOpTracerProvider().get_tracer("whatsapp-session-sidecar")
        self._traced = not isinstance(self._tracer, trace.NoOpTracer)
        self._store = store
        self._pending = pending
        self._sockets = sockets
        self._observers = list(observers)
        self._clock = clock
        self._socket_end_timeout = socket_end_timeout
        self._database_step_timeout = database_step_timeout
        self._sessions: dict[int, Session] = {}
        # Phones closed by the sidecar and not opened since: errors for them change nothing.
        self._closed: dict[int, PhoneRef] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # Queries ------------------------------------------------------------------------------------------

    def sessions(self) -> Iterator[Session]:
        return iter(self._sessions.values())

    def session(self, organization_phone_id: int) -> Session | None:
        return self._sessions.get(organization_phone_id)

    def is_closed(self, organization_phone_id: int) -> bool:
        return organization_phone_id in self._closed

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def closed_count(self) -> int:
        return len(self._closed)

    @property
    def background_tasks(self) -> int:
        return len(self._background)

    @property
    def held_count(self) -> int:
        return sum(1 for session in self._sessions.values() if session.state.phase is Phase.HELD)

    def get_session_error_stats(self, organization_phone_id: int) -> ErrorStats:
        session = self._sessions.get(organization_phone_id)
        if session is not None:
            return error_stats(self.current_counters(session), self.policy.limits)
        if organization_phone_id in self._closed:
            return error_stats(SessionState().counters, self.policy.limits)
        raise UnknownSession(organization_phone_id)

    def current_counters(self, session: Session) -> Counters:
        """The counters now: the windowed policy forgets errors that left the window since the last event."""
        if self.policy.health is HealthPolicy.WINDOWED:
            return windowed(session.state, None, self.policy.window_seconds, self._clock().timestamp()).counters
        return session.state.counters

    # Restart ------------------------------------------------------------------------------------------

    async def restore(self) -> int:
        """Continue from the counters the store kept (a restart loses no count)."""
        stored = await self._store.load_sessions()
        for item in stored:
            phone_id = item.phone.organization_phone_id
            if item.closed:
                self._closed.setdefault(phone_id, item.phone)
                continue
            session = self._sessions.get(phone_id)
            if session is None:
                self._sessions[phone_id] = Session(item.phone, SessionState(item.counters))
            elif session.state.phase is Phase.ACTIVE:
                # Counts taken since this start are queued behind the stored ones: the sum is the truth.
                counters = replace(
                    session.state.counters,
                    bad_mac_errors=session.state.counters.bad_mac_errors + item.counters.bad_mac_errors,
                    bad_decrypt_errors=session.state.counters.bad_decrypt_errors + item.counters.bad_decrypt_errors,
                )
                session.state = replace(session.state, counters=counters)
        return len(stored)

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
    ) -> ErrorClass:
        """Classify a raw decryption error and apply it; returns its class."""
        error_class = classify(error, source)
        phone = self._phone_ref(organization_id, organization_phone_id, phone_jid)
        peer_user = self._peer_user(peer_jid)
        await self._decrypt_error(phone, error_class, peer_user, trace_context)
        return error_class

    async def handle_bad_mac_error(
        self, organization_id: int, organization_phone_id: int, phone_jid: str, peer_jid: str | None = None
    ) -> bool:
        """The seed's handleBadMacError: True while the session continues, False once it is being closed."""
        phone = self._phone_ref(organization_id, organization_phone_id, phone_jid)
        return await self._decrypt_error(phone, ErrorClass.BAD_MAC, self._peer_user(peer_jid), None)

    async def handle_bad_decrypt_error(self, organization_id: int, organization_phone_id: int, phone_jid: str) -> bool:
        """The seed's handleBadDecryptError: True while the session continues, False once it is being closed."""
        phone = self._phone_ref(organization_id, organization_phone_id, phone_jid)
        return await self._decrypt_error(phone, ErrorClass.BAD_DECRYPT, None, None)

    async def _decrypt_error(
        self, phone: PhoneRef, error_class: ErrorClass, peer_user: str | None, trace_context: Context | None
    ) -> bool:
        # Without an exporter the tracer is a no-op; skipping even its context handling keeps ingest cheap.
        span_scope = (
            self._tracer.start_as_current_span("session.decrypt_error", context=trace_context)
            if self._traced
            else nullcontext(INVALID_SPAN)
        )
        with span_scope as span:
            for observer in self._observers:
                observer.decrypt_error(phone, error_class)
            continues = True
            now = self._clock().timestamp()
            if error_class is ErrorClass.BAD_MAC:
                continues, _ = await self._apply(phone, BadMac(peer_user, now), CounterKind.BAD_MAC, now)
            elif error_class is ErrorClass.BAD_DECRYPT:
                continues, _ = await self._apply(phone, BadDecrypt(now), CounterKind.BAD_DECRYPT, now)
            elif phone.organization_phone_id not in self._closed:
                # Counted-only classes change no counter, but the session is now known and has a last error.
                self._session_for(phone).last_error_at = now
            if span.is_recording():
                session = self._sessions.get(phone.organization_phone_id)
                counters = session.state.counters if session is not None else SessionState().counters
                after = (
                    counters.bad_decrypt_errors if error_class is ErrorClass.BAD_DECRYPT else counters.bad_mac_errors
                )
                span.set_attributes(
                    {
                        **_span_ids(phone),
                        "whatsapp.error.class": str(error_class),
                        "whatsapp.counter.after": after,
                        "whatsapp.session.continues": continues,
                    }
                )
            return continues

    @staticmethod
    def _peer_user(peer_jid: str | None) -> str | None:
        if not peer_jid:
            return None
        try:
            return parse_jid(peer_jid).bare
        except ValueError as error:
            raise InvalidInput("peerJid", str(error)) from None

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
        if connection not in CONNECTION_STATES:
            raise InvalidInput("connection", f"must be one of {', '.join(CONNECTION_STATES)}, got {connection!r}")
        phone = self._phone_ref(organization_id, organization_phone_id, phone_jid)
        now = self._clock().timestamp()
        if connection == "open":
            logged_out = self._logged_out.get(organization_phone_id)
            if (
                logged_out is not None
                and not logged_out.observed
                and organization_phone_id in self._closed
                and is_reconnect_after_logout(logged_out.at, now, self.safety.logout_stick_seconds, new_login)
            ):
                await self._logout_did_not_stick(self._closed[organization_phone_id], now - logged_out.at)
                return
            self._logged_out.pop(organization_phone_id, None)
            reopened = self._closed.pop(organization_phone_id, None) is not None
            session = self._session_for(phone)
            had_counts = session.state.counters != SessionState().counters
            self._set_connected(session, True)
            _, recovered = await self._apply(phone, ConnectionOpened(), None)
            if had_counts or reopened or recovered:
                await self._pending.submit(ResetCounters(session.phone, recovered))
        elif connection == "close":
            session_or_none = self._sessions.get(organization_phone_id)
            if session_or_none is not None:
                self._set_connected(session_or_none, False)
            for kind in self.safety.loops.on_close(organization_phone_id, now, status_code):
                await self._record(phone, str(kind), {"statusCode": status_code}, INCIDENT_EVENTS[kind])
            if organization_phone_id not in self._closed:
                await self._apply(phone, ConnectionClosed(status_code), None)

    async def _logout_did_not_stick(self, phone: PhoneRef, seconds_after: float) -> None:
        """Some runtime reconnected a phone the sidecar logged out: say so, and end it again."""
        detail = {"secondsAfterLogout": round(seconds_after, 3)}
        await self._record(
            phone, str(IncidentKind.RECONNECTED_AFTER_LOGOUT), detail, NotificationEvent.RECONNECTED_AFTER_LOGOUT
        )
        reason = "reconnected after a sidecar logout without a new login"
        self._spawn(
            self._socket_command(
                self._sockets.end_session(phone.organization_phone_id, "reconnected_after_logout", reason), "ended"
            )
        )

    async def _record(
        self, phone: PhoneRef | None, decision: str, detail: dict[str, Any], event: NotificationEvent | None
    ) -> None:
        """A safety decision: to the closure log (database and file), the observers, and the owners."""
        stats: dict[str, Any] = {}
        if phone is not None:
            session = self._sessions.get(phone.organization_phone_id)
            counters = self.current_counters(session) if session is not None else SessionState().counters
            stats = dict(error_stats(counters, self.policy.limits))
        notification = self._notification(event, stats, decision) if event is not None else None
        step = RecordDecision(uuid.uuid4().hex, decision, self._clock(), phone, detail, notification)
        for observer in self._observers:
            observer.decided(step)
        await self._pending.submit(step)

    async def force_close_session(self, organization_phone_id: int, reason: str) -> CloseOutcome:
        """The seed's forceCloseSession: the same close, started by an operator. Waits for it to finish."""
        reason = reason.strip() if isinstance(reason, str) else ""
        if not reason:
            raise InvalidInput("reason", "must be a non-empty text saying why the session is closed")
        if len(reason) > 500:
            raise InvalidInput("reason", "must be at most 500 characters")
        session = self._sessions.get(organization_phone_id)
        if session is None:
            if organization_phone_id in self._closed:
                return CloseOutcome(await self._last_closure(organization_phone_id), already_closed=True)
            raise UnknownSession(organization_phone_id)
        if session.close_task is not None:
            await asyncio.shield(session.close_task)
            return CloseOutcome(session.close_task.result(), already_closed=True)
        with self._tracer.start_as_current_span("session.force_close", attributes=_span_ids(session.phone)):
            self._transition(session, OperatorClose(reason), CloseTrigger.OPERATOR)  # the close task inherits the span
        assert session.close_task is not None
        return CloseOutcome(await asyncio.shield(session.close_task), already_closed=False)

    # Operator controls (fleet safety) -------------------------------------------------------------------

    def breaker_status(self) -> Any:
        return self.safety.breaker.status(self._clock().timestamp(), len(self._sessions), self.held_count)

    async def release_breaker(self, operator: str, close_held: bool) -> list[ClosureRecord]:
        """Resume automatic logouts; with `close_held`, close the sessions held meanwhile (reason forced)."""
        self.safety.breaker.release()
        held = [session for session in self._sessions.values() if session.state.phase is Phase.HELD]
        detail = {"operator": operator, "closeHeld": close_held, "held": len(held)}
        await self._record(None, "breaker.released", detail, NotificationEvent.BREAKER_RELEASED)
        if not close_held:
            return []
        for session in held:
            reason = f"held by the circuit breaker; closed on release by {operator}"
            self._transition(session, OperatorClose(reason), CloseTrigger.OPERATOR)
        tasks = [session.close_task for session in held if session.close_task is not None]
        return list(await asyncio.gather(*tasks))

    async def keep_breaker(self, operator: str) -> None:
        self.safety.breaker.keep(operator)
        await self._record(None, "breaker.kept", {"operator": operator}, None)

    async def trip_breaker(self, operator: str) -> None:
        was_tripped = self.safety.breaker.tripped
        self.safety.breaker.trip(self._clock().timestamp(), operator)
        if not was_tripped:
            await self._record(None, "breaker.tripped", {"operator": operator}, NotificationEvent.BREAKER_TRIPPED)

    async def set_mode(self, mode: Mode, observe_organizations: frozenset[int], operator: str) -> None:
        self.safety.mode, self.safety.observe_organizations = mode, observe_organizations
        detail = {"operator": operator, "mode": str(mode), "observeOrganizations": sorted(observe_organizations)}
        await self._record(None, "mode.changed", detail, None)

    async def settle(self) -> None:
        """Wait for every background effect started so far (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Let running closes finish (bounded), then cancel what is left."""
        try:
            await asyncio.wait_for(self.settle(), grace_seconds)
        except TimeoutError:
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # Internals ----------------------------------------------------------------------------------------

    def _phone_ref(self, organization_id: int, organization_phone_id: int, phone_jid: str) -> PhoneRef:
        for name, value in (
            ("organizationId", organization_id),
            ("organizationPhoneId", organization_phone_id),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(name, "must be a positive integer")
        try:
            user = parse_jid(phone_jid).bare
        except ValueError as error:
            raise InvalidInput("phoneJid", str(error)) from None
        return PhoneRef(organization_id, organization_phone_id, user)

    def _session_for(self, phone: PhoneRef) -> Session:
        session = self._sessions.get(phone.organization_phone_id)
        if session is None:
            session = Session(phone, SessionState())
            self._sessions[phone.organization_phone_id] = session
        elif session.phone.phone_user is None and phone.phone_user:
            session.phone = phone
        return session

    def _set_connected(self, session: Session, connected: bool) -> None:
        if session.connected != connected:
            session.connected = connected
            for observer in self._observers:
                observer.connection_changed(session.phone, connected)

    async def _apply(
        self, phone: PhoneRef, event: Event, counted: CounterKind | None, now: float | None = None
    ) -> tuple[bool, Notification | None]:
        """Decide (synchronously), then persist the count with the health flip it caused, if any.

        Returns whether the session continues (False once it is being closed) and that flip's notification.
        """
        if phone.organization_phone_id in self._closed and not isinstance(event, ConnectionOpened):
            return False, None
        session = self._session_for(phone)
        before = session.state
        if counted is not None:
            session.last_error_at = now if now is not None else self._clock().timestamp()
        trigger = CloseTrigger.AUTOMATIC if counted is not None else CloseTrigger.CONNECTION
        decision, flip = self._transition(session, event, trigger)
        if counted is not None and _count(session.state.counters, counted) > _count(before.counters, counted):
            await self._pending.submit(IncrementCounter(session.phone, counted, flip))
        if isinstance(decision, Hold):
            detail = {"reason": str(decision.reason), "detail": decision.detail}
            await self._record(session.phone, "session.held", detail, NotificationEvent.HELD)
        if self._breaker_just_tripped:
            self._breaker_just_tripped = False
            status = self.breaker_status()
            detail = {"closesInWindow": status.closes_in_window, "allowedInWindow": status.allowed_in_window}
            await self._record(None, "breaker.tripped", detail, NotificationEvent.BREAKER_TRIPPED)
        return not isinstance(decision, Close | Hold) and session.state.phase is Phase.ACTIVE, flip

    def _transition(self, session: Session, event: Event, trigger: CloseTrigger) -> tuple[object, Notification | None]:
        before = session.state
        transition = decide(before, event, self.policy)
        if (
            trigger is CloseTrigger.AUTOMATIC
            and isinstance(transition.decision, Close)
            and transition.decision.reason in CRYPTO_LIMIT_REASONS
        ):
            was_tripped = self.safety.breaker.tripped
            if not self.safety.breaker.admit(self._clock().timestamp(), len(self._sessions)):
                self._breaker_just_tripped = not was_tripped
                transition = decide(before, event, self.policy, automatic_closes_allowed=False)
        session.state = transition.state
        healthy_before = is_healthy(before.counters, self.policy.limits)
        healthy_after = is_healthy(transition.state.counters, self.policy.limits)
        flip: Notification | None = None
        for observer in self._observers:
            observer.counters_changed(session.phone, transition.state.counters)
        if healthy_before != healthy_after and transition.state.phase is Phase.ACTIVE:
            stats = error_stats(transition.state.counters, self.policy.limits)
            for observer in self._observers:
                observer.health_changed(session.phone, stats)
            event_kind = NotificationEvent.RECOVERED if healthy_after else NotificationEvent.UNHEALTHY
            flip = self._notification(event_kind, dict(stats), None)
        decision = transition.decision
        if isinstance(decision, Heal):
            if session.heal_task is not None and not session.heal_task.done():
                queued = session.queued_heals.get(decision.scope, ())
                session.queued_heals[decision.scope] = queued + tuple(
                    prefix for prefix in decision.key_prefixes if prefix not in queued
                )
                for observer in self._observers:
                    observer.heal_coalesced(session.phone, decision)
            else:
                session.heal_task = self._spawn(self._heal_until_done(session, decision))
        elif isinstance(decision, Close):
            session.queued_heals.clear()  # the close deletes every key: pending heals are superseded
            session.close_task = self._spawn(self._close(session, decision, trigger))
        return decision, flip

    def _notification(self, event: NotificationEvent, stats: dict[str, Any], reason: str | None) -> Notification | None:
        """An owner notification, when owners are configured (the outbox stays empty otherwise)."""
        if not self._notifications:
            return None
        context = trace.get_current_span().get_span_context()
        trace_id = format(context.trace_id, "032x") if context.is_valid else None
        return Notification(uuid.uuid4().hex, event, self._clock(), stats, reason, trace_id)

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _heal_until_done(self, session: Session, first: Heal) -> None:
        heal: Heal | None = first
        while heal is not None:
            await self._heal(session, heal)
            heal = None
            if session.state.phase is Phase.ACTIVE and session.queued_heals:
                scope, prefixes = session.queued_heals.popitem()
                heal = Heal(scope, prefixes)
        session.queued_heals.clear()

    async def _heal(self, session: Session, heal: Heal) -> None:
        with self._tracer.start_as_current_span("session.heal", attributes=_span_ids(session.phone)) as span:
            await self._heal_in_span(session, heal, span)

    async def _heal_in_span(self, session: Session, heal: Heal, span: Span) -> None:
        started = time.monotonic()
        observe = self.safety.observing(session.phone.organization_id)
        future = await self._pending.submit(DeleteKeys(session.phone, heal.scope, heal.key_prefixes, observe))
        keys_deleted: int | None = None
        outcome = StepOutcome.OK
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self._database_step_timeout)
            keys_deleted = result if isinstance(result, int) else None
        except TimeoutError:
            outcome = StepOutcome.PENDING
        except Exception as error:
            outcome = f"{StepOutcome.FAILED}: {type(error).__name__}: {error}"  # type: ignore[assignment]
        if observe:
            socket = f"{StepOutcome.SKIPPED}: observe mode"
            keys_deleted = None  # only counted: nothing was deleted
        elif session.state.phase is Phase.ACTIVE:
            socket = await self._socket_command(
                self._sockets.clear_cached_keys(session.organization_phone_id, heal.key_prefixes), "cleared"
            )
        else:
            socket = "skipped: superseded by a close"  # the close deletes every key and ends the socket anyway
        if span.is_recording():
            span.set_attributes(
                {"whatsapp.heal.scope": str(heal.scope), "whatsapp.auth.keys_deleted": keys_deleted or 0}
            )
            if str(outcome).startswith(StepOutcome.FAILED):
                _fail(span, str(outcome))
        for observer in self._observers:
            observer.healed(session.phone, heal, keys_deleted, str(outcome), socket, time.monotonic() - started)

    async def _socket_command(self, command: Any, done: str) -> str:
        try:
            await asyncio.wait_for(command, self._socket_end_timeout)
        except SocketUnreachable:
            return "unreachable"
        except TimeoutError:
            return "timeout"
        except SocketCommandFailed as error:
            return f"{StepOutcome.FAILED}: {error}"
        except Exception as error:
            return f"{StepOutcome.FAILED}: {type(error).__name__}: {error}"
        return done

    async def _close(self, session: Session, decision: Close, trigger: CloseTrigger) -> ClosureRecord:
        """Close order: end the socket, then the database half (keys, status, record, counters), then forget.

        Every step is attempted whatever happened to the ones before; the session is forgotten in any case.
        """
        started = time.monotonic()
        observe = self.safety.observing(session.phone.organization_id)
        record = ClosureRecord(
            closure_id=uuid.uuid4().hex,
            phone=session.phone,
            reason=decision.reason,
            trigger=trigger,
            detail=decision.detail,
            counters=decision.counters,
            started_at=self._clock(),
        )
        with self._tracer.start_as_current_span("session.close", attributes=_span_ids(session.phone)) as span:
            try:
                for observer in self._observers:
                    observer.closing(record)
                with self._tracer.start_as_current_span("runtime.end_socket") as socket_span:
                    if observe:
                        record.socket = f"{StepOutcome.SKIPPED}: observe mode"
                    else:
                        record.socket = await self._socket_command(
                            self._sockets.end_session(
                                session.organization_phone_id, str(decision.reason), decision.detail
                            ),
                            "ended",
                        )
                        if record.socket != "ended":
                            _fail(socket_span, record.socket)
                record.steps["socket"] = record.socket
                database_steps, record.keys_deleted, timings = await self._logout(record, observe)
                record.steps.update(database_steps)
                self._trace_database_parts(record.steps, timings)
            finally:
                record.duration_seconds = time.monotonic() - started
                self._logged_out[session.organization_phone_id] = LoggedOut(self._clock().timestamp(), observe)
                self._forget(session)
                if span.is_recording():
                    span.set_attributes(
                        {
                            "whatsapp.close.reason": str(record.reason),
                            "whatsapp.close.trigger": str(record.trigger),
                            "whatsapp.auth.keys_deleted": record.keys_deleted or 0,
                        }
                    )
                for observer in self._observers:
                    observer.closed(record)
        return record

    def _trace_database_parts(self, steps: dict[str, str], timings: dict[str, tuple[int, int]]) -> None:
        for part, span_name in DATABASE_SPANS.items():
            started, ended = timings.get(part, (None, None))
            span = self._tracer.start_span(span_name, start_time=started)
            if steps.get(part, "").startswith((StepOutcome.FAILED, StepOutcome.PENDING)):
                _fail(span, steps[part])
            span.end(end_time=ended)

    async def _logout(
        self, record: ClosureRecord, observe: bool = False
    ) -> tuple[dict[str, str], int | None, dict[str, tuple[int, int]]]:
        """The database half of a close; waits a bounded time, then reports it as pending."""
        try:
            closed = self._notification(
                NotificationEvent.CLOSED, dict(error_stats(record.counters, self.policy.limits)), str(record.reason)
            )
            future = await self._pending.submit(Logout(replace(record, steps=dict(record.steps)), closed, observe))
            result = await asyncio.wait_for(asyncio.shield(future), self._database_step_timeout)
        except TimeoutError:
            return dict.fromkeys(DATABASE_PARTS, StepOutcome.PENDING), None, {}
        except Exception as error:
            return dict.fromkeys(DATABASE_PARTS, f"{StepOutcome.FAILED}: {type(error).__name__}: {error}"), None, {}
        assert isinstance(result, LogoutResult)
        steps = {name: value for name, value in result.steps.items() if name != "socket"}
        return steps, result.keys_deleted, result.timings

    def _forget(self, session: Session) -> None:
        session.state = decide(session.state, CloseCompleted(), self.policy).state
        self._sessions.pop(session.organization_phone_id, None)
        self.safety.loops.forget(session.organization_phone_id)
        self._closed[session.organization_phone_id] = session.phone
        for observer in self._observers:
            observer.forgotten(session.phone)

    async def _last_closure(self, organization_phone_id: int) -> ClosureRecord | None:
        try:
            closures = await self._store.recent_closures(organization_phone_id, 1)
        except Exception:
            return None
        return closures[0] if closures else None


def _span_ids(phone: PhoneRef) -> dict[str, int]:
    return {
        "whatsapp.organization_id": phone.organization_id,
        "whatsapp.organization_phone_id": phone.organization_phone_id,
    }


def _fail(span: Span, outcome: str) -> None:
    """Mark a span failed; `outcome` looks like 'failed: RaiseError: …', 'timeout' or 'unreachable'."""
    parts = outcome.split(": ")
    error_type = parts[1] if parts[0] == StepOutcome.FAILED and len(parts) > 2 else parts[0]
    span.set_status(Status(StatusCode.ERROR, outcome))
    span.set_attribute("error.type", error_type)


def _count(counters: Counters, kind: CounterKind) -> int:
    return counters.bad_mac_errors if kind is CounterKind.BAD_MAC else counters.bad_decrypt_errors
