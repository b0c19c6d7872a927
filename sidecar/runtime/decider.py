"""Where decisions are taken: the Decider port, and its local form (one replica, in this process). The fleet's
form (decisions in PostgreSQL transactions shared by every replica) is runtime/fleet_decider.py. The engine, the
operator's controls, the app factory and the HTTP API ask the decider; none of them asks whether there is a
fleet.

Locally a decision is taken synchronously: no await between reading a session's state and writing the next,
so concurrent events for one session can never start two closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from sidecar.ports import SessionStore, StoredSession
from sidecar.rules.policy import (
    Close,
    ConnectionClosed,
    ConnectionOpened,
    Counters,
    ErrorStats,
    Event,
    Hold,
    OperatorClose,
    Phase,
    SessionState,
    error_stats,
)
from sidecar.rules.policy import decide as policy_decide  # what a Decider does is `decide` too
from sidecar.rules.records import (
    CloseTrigger,
    ClosureRecord,
    CounterKind,
    IncrementCounter,
    Notification,
    NotificationEvent,
    PhoneRef,
    ResetCounters,
)
from sidecar.rules.safety import BreakerStatus, Mode
from sidecar.runtime.close import CloseSequence
from sidecar.runtime.effects import Effects
from sidecar.runtime.errors import InvalidInput, UnknownSession
from sidecar.runtime.incidents import Incidents
from sidecar.runtime.operator import CloseOutcome, all_done, closed_outcome, last_closure, mode_detail
from sidecar.runtime.outcomes import span_ids
from sidecar.runtime.parts import ZERO_COUNTERS, RuntimeParts
from sidecar.runtime.registry import Session
from sidecar.runtime.safety_state import SafetyView, needs_admission
from sidecar.runtime.waiting import Result, Traced

STEADY = SessionState()  # an active session with nothing counted: what an `open` leaves


@dataclass(frozen=True, slots=True)
class DecisionTools:
    """What either decider carries decisions out with."""

    parts: RuntimeParts
    effects: Effects
    closes: CloseSequence
    incidents: Incidents
    store: SessionStore


class Decider(Protocol):
    """Decides the runtime's events and the operator's actions, and carries the decisions out."""

    @property
    def decides_later(self) -> bool:
        """Decisions come at the end of a batch (a decrypt error's span stays open until then)."""
        ...

    @property
    def breaker_tripped(self) -> bool: ...

    @property
    def backlog(self) -> int:
        """Events accepted and waiting for their decision."""
        ...

    @property
    def oldest_undecided_age(self) -> float:
        """Seconds the oldest of them has waited (0 with none)."""
        ...

    @property
    def unavailable_reason(self) -> str | None:
        """Why events cannot be decided now (the database is away), for /readyz; None when they can."""
        ...

    @property
    def stalled_reason(self) -> str | None:
        """Why some events have waited too long on rows or locks held elsewhere, for /readyz; None otherwise."""
        ...

    @property
    def parked_phones(self) -> int:
        """Phones whose events wait on a row or lock another database session holds."""
        ...

    def durable_mark(self) -> int:
        """A mark for everything accepted so far (the runtime link acknowledges events once it is durable)."""
        ...

    async def until_durable(self, mark: int) -> None:
        """Until everything accepted up to `mark` survives this process (decided, or journaled)."""
        ...

    def batch(self, origin: tuple[str, int] | None = None) -> AbstractAsyncContextManager[None]:
        """Wrap the events of one frame or body (decided together where that saves transactions); `origin`: the
        frame's runtime id and highest seq, remembered with the decisions where they are shared."""
        ...

    async def apply(
        self, phone: PhoneRef, event: Event, counted: CounterKind | None, now: float, traced: Traced | None
    ) -> Result:
        """Decide, carry out; (the session continues, the health flip's notification)."""
        ...

    async def opened(self, phone: PhoneRef, now: float, new_login: bool) -> None: ...

    def steady(self, organization_phone_id: int) -> Session | None:
        """The session, when an `open` of it (not a new login) decides nothing and changes no state here: a batch
        then only restarts its liveness watch (runtime/tally.py); None when the open must be decided."""
        ...

    async def closed(self, phone: PhoneRef, now: float, status_code: int | None) -> None: ...

    async def session_error_stats(self, organization_phone_id: int) -> ErrorStats: ...

    def restore(self, stored: Sequence[StoredSession]) -> None:
        """The counters the store kept, loaded at start (a restart loses no count)."""
        ...

    async def start(self) -> int:
        """Decide what was accepted and not decided before the last stop; returns how many."""
        ...

    async def stop(self) -> None: ...

    def background(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The decider's own background work, by task name (the app supervises it)."""
        ...

    async def force_close(self, organization_phone_id: int, reason: str) -> CloseOutcome: ...

    async def safety_view(self) -> SafetyView: ...

    async def breaker_status(self) -> BreakerStatus: ...

    async def release_breaker(self, operator: str, close_held: bool) -> list[ClosureRecord]: ...

    async def keep_breaker(self, operator: str) -> None: ...

    async def trip_breaker(self, operator: str) -> None: ...

    async def set_mode(self, mode: Mode, observe_organizations: frozenset[int], operator: str) -> None: ...


class LocalDecider:
    """One replica: the decisions, the breaker and the mode live in this process."""

    decides_later = False
    backlog = 0  # decided as they come
    oldest_undecided_age = 0.0
    unavailable_reason: str | None = None
    stalled_reason: str | None = None
    parked_phones = 0

    def durable_mark(self) -> int:
        return 0  # decided as they come: applied once `apply` returns (its steps journaled with --state-dir)

    async def until_durable(self, mark: int) -> None:
        return None

    def __init__(self, tools: DecisionTools) -> None:
        self._parts = parts = tools.parts
        self._registry = parts.registry
        self._safety = parts.safety
        self._effects = tools.effects
        self._closes = tools.closes
        self._incidents = tools.incidents
        self._store = tools.store

    @property
    def breaker_tripped(self) -> bool:
        return self._safety.breaker.tripped

    def batch(self, origin: tuple[str, int] | None = None) -> AbstractAsyncContextManager[None]:
        return nullcontext()

    def restore(self, stored: Sequence[StoredSession]) -> None:
        self._registry.restore(stored)

    async def start(self) -> int:
        return 0

    async def stop(self) -> None:
        return None

    def background(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {}

    # Events -------------------------------------------------------------------------------------------

    async def apply(
        self, phone: PhoneRef, event: Event, counted: CounterKind | None, now: float, traced: Traced | None
    ) -> Result:
        """Decide, then persist the count with the health flip it caused, if any."""
        if not isinstance(event, ConnectionOpened) and self._registry.is_closed(phone.organization_phone_id):
            return False, None
        session = self._registry.ensure(phone)
        before = session.state
        if counted is not None:
            session.last_error_at = now
        trigger = CloseTrigger.AUTOMATIC if counted is not None else CloseTrigger.CONNECTION
        decision, flip, just_tripped = self._transition(session, event, trigger)
        if counted is not None and _count(session.state.counters, counted) > _count(before.counters, counted):
            await self._parts.steps.submit(IncrementCounter(session.phone, counted, flip))
        await self._effects.after_decision(session.phone, decision, self._status() if just_tripped else None)
        continues = not isinstance(decision, Close | Hold) and session.state.phase is Phase.ACTIVE
        if traced is not None:
            traced.decided(continues)
        return continues, flip

    def _transition(
        self, session: Session, event: Event, trigger: CloseTrigger
    ) -> tuple[object, Notification | None, bool]:
        """The rules' decision for this event, its state written back, its effect started. Also returns the
        health flip's notification and whether the breaker tripped on this decision."""
        policy = self._parts.policy
        before = session.state
        transition = policy_decide(before, event, policy)
        just_tripped = False
        if needs_admission(transition, trigger):
            admitted, just_tripped = self._safety.admit_automatic_close(self._parts.now(), self._registry.session_count)
            if not admitted:
                transition = policy_decide(before, event, policy, automatic_closes_allowed=False)
        flip = self._effects.health_flip(before, transition.state)
        self._effects.carry_out(session, before, transition, trigger, flip)
        return transition.decision, flip, just_tripped

    async def opened(self, phone: PhoneRef, now: float, new_login: bool) -> None:
        organization_phone_id = phone.organization_phone_id
        if self.steady(organization_phone_id) is not None:
            return  # the rules would give back the same state and no decision: nothing to write or carry out
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
        _, recovered = await self.apply(phone, ConnectionOpened(), None, now, None)
        if had_counts or reopened or recovered:
            await self._parts.steps.submit(ResetCounters(session.phone, recovered))

    def steady(self, organization_phone_id: int) -> Session | None:
        """A reconnect flood is mostly this: an open session with nothing counted, opened again. The rules give
        back the same state and no decision for it (rules/policy.py: an open is a clean slate); a live session is
        never a closed phone (registry.close_out), so no logout can have failed to stick."""
        session = self._registry.get(organization_phone_id)
        if session is not None and session.connected and session.state == STEADY and session.phone.phone_user:
            return session
        return None

    async def closed(self, phone: PhoneRef, now: float, status_code: int | None) -> None:
        await self._incidents.connection_closed(phone, now, status_code)
        if not self._registry.is_closed(phone.organization_phone_id):
            await self.apply(phone, ConnectionClosed(status_code), None, now, None)

    async def session_error_stats(self, organization_phone_id: int) -> ErrorStats:
        session = self._registry.get(organization_phone_id)
        if session is not None:
            return error_stats(self._parts.counters_now(session), self._parts.policy.limits)
        if self._registry.is_closed(organization_phone_id):
            return error_stats(ZERO_COUNTERS, self._parts.policy.limits)
        raise UnknownSession(organization_phone_id)

    # Operators ----------------------------------------------------------------------------------------

    async def force_close(self, organization_phone_id: int, reason: str) -> CloseOutcome:
        session = self._registry.get(organization_phone_id)
        if session is None:
            if self._registry.closed_phone(organization_phone_id) is not None:
                return CloseOutcome(await last_closure(self._store, organization_phone_id), already_closed=True)
            raise UnknownSession(organization_phone_id)
        running = self._closes.in_flight(organization_phone_id)
        if running is not None:
            await asyncio.shield(running)
            return closed_outcome(running.result(), already_closed=True)
        with self._parts.tracer.start_as_current_span("session.force_close", attributes=span_ids(session.phone)):
            self._transition(session, OperatorClose(reason), CloseTrigger.OPERATOR)  # the task inherits the span
        started = self._closes.in_flight(organization_phone_id)
        assert started is not None
        return closed_outcome(await asyncio.shield(started), already_closed=False)

    def _status(self) -> BreakerStatus:
        return self._safety.breaker.status(self._parts.now(), self._registry.session_count, self._registry.held_count)

    async def breaker_status(self) -> BreakerStatus:
        return self._status()

    async def safety_view(self) -> SafetyView:
        safety = self._safety
        return SafetyView(self._status(), safety.breaker.config, safety.mode, safety.observe_organizations)

    async def release_breaker(self, operator: str, close_held: bool) -> list[ClosureRecord]:
        """Resume automatic logouts; with `close_held`, close the sessions held meanwhile (reason forced)."""
        self._safety.breaker.release()
        self._safety.restarts.release()  # deaf-session restarts resume too
        held = [session for session in self._registry.sessions() if session.state.phase is Phase.HELD]
        detail = {"operator": operator, "closeHeld": close_held, "held": len(held)}
        await self._incidents.record(None, "breaker.released", detail, NotificationEvent.BREAKER_RELEASED)
        if not close_held:
            return []
        reason = f"held by the circuit breaker; closed on release by {operator}"
        for session in held:
            self._transition(session, OperatorClose(reason), CloseTrigger.OPERATOR)
        tasks = [self._closes.in_flight(session.organization_phone_id) for session in held]
        return all_done(await asyncio.gather(*[task for task in tasks if task is not None]))

    async def keep_breaker(self, operator: str) -> None:
        if not self._safety.breaker.tripped:
            raise InvalidInput("action", "keep applies to a tripped breaker; it is not tripped")
        self._safety.breaker.keep(operator)
        await self._incidents.record(None, "breaker.kept", {"operator": operator}, None)

    async def trip_breaker(self, operator: str) -> None:
        was_tripped = self._safety.breaker.tripped
        self._safety.breaker.trip(self._parts.now(), operator)
        if not was_tripped:
            detail = {"operator": operator}
            await self._incidents.record(None, "breaker.tripped", detail, NotificationEvent.BREAKER_TRIPPED)

    async def set_mode(self, mode: Mode, observe_organizations: frozenset[int], operator: str) -> None:
        self._safety.mode, self._safety.observe_organizations = mode, observe_organizations
        await self._incidents.record(None, "mode.changed", mode_detail(mode, observe_organizations, operator), None)


def _count(counters: Counters, kind: CounterKind) -> int:
    return counters.bad_mac_errors if kind is CounterKind.BAD_MAC else counters.bad_decrypt_errors
