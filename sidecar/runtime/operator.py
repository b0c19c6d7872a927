"""Operator controls: forceCloseSession, and the fleet safety switches (breaker release/keep/trip, mode). Each
change is recorded as a decision (closure log, observers, owners)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import trace

from sidecar.ports import SessionStore
from sidecar.rules.inputs import text_problem
from sidecar.rules.policy import Phase
from sidecar.rules.records import ClosureRecord, NotificationEvent, StepOutcome
from sidecar.rules.safety import BreakerStatus, Mode
from sidecar.runtime.close import CloseSequence, database_failed
from sidecar.runtime.errors import CloseIncomplete, InvalidInput, UnknownSession
from sidecar.runtime.fleet import FleetDecisions
from sidecar.runtime.fleet_safety import Incidents, Safety, SafetyView
from sidecar.runtime.outcomes import span_ids
from sidecar.runtime.registry import Session, SessionRegistry

MAX_REASON_LENGTH = 500


@dataclass(frozen=True, slots=True)
class CloseOutcome:
    record: ClosureRecord | None
    already_closed: bool


def _outcome(record: ClosureRecord, already_closed: bool) -> CloseOutcome:
    """A close whose database half failed by itself was undone (the session stays open): say so, do not report
    it as done, so the operator retries instead of reading `alreadyClosed`."""
    if database_failed(record):
        failed = {part: step for part, step in record.steps.items() if step.startswith(StepOutcome.FAILED)}
        raise CloseIncomplete(record, failed)
    return CloseOutcome(record, already_closed)


def _all_done(records: list[ClosureRecord]) -> list[ClosureRecord]:
    """The held sessions closed on a release; one whose database half failed is named (it stays open)."""
    for record in records:
        _outcome(record, already_closed=False)
    return records


class OperatorControls:
    def __init__(
        self,
        registry: SessionRegistry,
        closes: CloseSequence,
        safety: Safety,
        incidents: Incidents,
        store: SessionStore,
        tracer: trace.Tracer,
        now: Callable[[], float],
        operator_close: Callable[[Session, str], None],
        fleet: FleetDecisions | None = None,
    ) -> None:
        self._registry = registry
        self._closes = closes
        self._safety = safety
        self._incidents = incidents
        self._store = store
        self._tracer = tracer
        self._now = now
        self._operator_close = operator_close  # decide an operator close for a session and start it
        self._fleet = fleet  # fleet mode: claims, breaker and mode live in PostgreSQL

    async def force_close_session(self, organization_phone_id: int, reason: str) -> CloseOutcome:
        """The seed's forceCloseSession: the same close, started by an operator. Waits for it to finish."""
        reason = reason.strip() if isinstance(reason, str) else ""
        if not reason:
            raise InvalidInput("reason", "must be a non-empty text saying why the session is closed")
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidInput("reason", f"must be at most {MAX_REASON_LENGTH} characters")
        if (problem := text_problem(reason)) is not None:
            raise InvalidInput("reason", problem)
        if self._fleet is not None:
            return await self._fleet_force_close(self._fleet, organization_phone_id, reason)
        session = self._registry.get(organization_phone_id)
        if session is None:
            if self._registry.closed_phone(organization_phone_id) is not None:
                return CloseOutcome(await self._last_closure(organization_phone_id), already_closed=True)
            raise UnknownSession(organization_phone_id)
        running = self._closes.in_flight(organization_phone_id)
        if running is not None:
            await asyncio.shield(running)
            return _outcome(running.result(), already_closed=True)
        with self._tracer.start_as_current_span("session.force_close", attributes=span_ids(session.phone)):
            self._operator_close(session, reason)  # the close task inherits the span
        started = self._closes.in_flight(organization_phone_id)
        assert started is not None
        return _outcome(await asyncio.shield(started), already_closed=False)

    async def _fleet_force_close(self, fleet: FleetDecisions, organization_phone_id: int, reason: str) -> CloseOutcome:
        """The close is claimed in the database: exactly one replica closes; the others answer alreadyClosed."""
        running = self._closes.in_flight(organization_phone_id)
        if running is not None:
            await asyncio.shield(running)
            return _outcome(running.result(), already_closed=True)
        session = self._registry.get(organization_phone_id)
        found = await fleet.phone_of(organization_phone_id)
        if found is None and session is None:
            raise UnknownSession(organization_phone_id)
        if found is not None and found[1] in (Phase.CLOSING, Phase.CLOSED):
            return CloseOutcome(await self._last_closure(organization_phone_id), already_closed=True)
        phone = session.phone if session is not None else found[0] if found is not None else None
        assert phone is not None
        with self._tracer.start_as_current_span("session.force_close", attributes=span_ids(phone)):
            claimed = await fleet.claim_operator_close(phone, reason)
        started = self._closes.in_flight(organization_phone_id)
        if not claimed or started is None:
            return CloseOutcome(await self._last_closure(organization_phone_id), already_closed=True)
        return _outcome(await asyncio.shield(started), already_closed=False)

    async def _last_closure(self, organization_phone_id: int) -> ClosureRecord | None:
        try:
            closures = await self._store.recent_closures(organization_phone_id, 1)
        except Exception:
            return None
        return closures[0] if closures else None

    def safety_view(self) -> SafetyView:
        safety = self._safety
        return SafetyView(self.breaker_status(), safety.breaker.config, safety.mode, safety.observe_organizations)

    async def fleet_safety_view(self) -> SafetyView:
        """As `safety_view`, but in fleet mode read from the database: every replica answers the same."""
        if self._fleet is None:
            return self.safety_view()
        await self._fleet.refresh_settings()
        safety = self._safety
        status = await self.fleet_breaker_status()
        return SafetyView(status, safety.breaker.config, safety.mode, safety.observe_organizations)

    async def fleet_breaker_status(self) -> BreakerStatus:
        if self._fleet is None:
            return self.breaker_status()
        return await self._fleet.fleet.breaker_status(self._now())

    def breaker_status(self) -> BreakerStatus:
        return self._safety.breaker.status(self._now(), self._registry.session_count, self._registry.held_count)

    async def release_breaker(self, operator: str, close_held: bool) -> list[ClosureRecord]:
        """Resume automatic logouts; with `close_held`, close the sessions held meanwhile (reason forced)."""
        if self._fleet is not None:
            return await self._fleet_release(self._fleet, operator, close_held)
        self._safety.breaker.release()
        self._safety.restarts.release()  # deaf-session restarts resume too
        held = [session for session in self._registry.sessions() if session.state.phase is Phase.HELD]
        detail = {"operator": operator, "closeHeld": close_held, "held": len(held)}
        await self._incidents.record(None, "breaker.released", detail, NotificationEvent.BREAKER_RELEASED)
        if not close_held:
            return []
        for session in held:
            self._operator_close(session, f"held by the circuit breaker; closed on release by {operator}")
        tasks = [self._closes.in_flight(session.organization_phone_id) for session in held]
        return _all_done(await asyncio.gather(*[task for task in tasks if task is not None]))

    async def _fleet_release(self, fleet: FleetDecisions, operator: str, close_held: bool) -> list[ClosureRecord]:
        await fleet.fleet.release_breaker()
        self._safety.restarts.release()  # this replica's deaf-session restarts resume too
        await fleet.refresh_settings()
        held = (await fleet.fleet.breaker_status(self._now())).held
        detail = {"operator": operator, "closeHeld": close_held, "held": held}
        await self._incidents.record(None, "breaker.released", detail, NotificationEvent.BREAKER_RELEASED)
        if not close_held:
            return []
        tasks = await fleet.close_held(f"held by the circuit breaker; closed on release by {operator}")
        return _all_done(await asyncio.gather(*tasks))

    async def keep_breaker(self, operator: str) -> None:
        if self._fleet is not None:
            if not await self._fleet.fleet.keep_breaker(operator):
                raise InvalidInput("action", "keep applies to a tripped breaker; it is not tripped")
            await self._incidents.record(None, "breaker.kept", {"operator": operator}, None)
            return
        if not self._safety.breaker.tripped:
            raise InvalidInput("action", "keep applies to a tripped breaker; it is not tripped")
        self._safety.breaker.keep(operator)
        await self._incidents.record(None, "breaker.kept", {"operator": operator}, None)

    async def trip_breaker(self, operator: str) -> None:
        if self._fleet is not None:
            fresh = await self._fleet.fleet.trip_breaker(self._now(), operator)
            await self._fleet.refresh_settings()
            if fresh:
                detail = {"operator": operator}
                await self._incidents.record(None, "breaker.tripped", detail, NotificationEvent.BREAKER_TRIPPED)
            return
        was_tripped = self._safety.breaker.tripped
        self._safety.breaker.trip(self._now(), operator)
        if not was_tripped:
            detail = {"operator": operator}
            await self._incidents.record(None, "breaker.tripped", detail, NotificationEvent.BREAKER_TRIPPED)

    async def set_mode(self, mode: Mode, observe_organizations: frozenset[int], operator: str) -> None:
        if self._fleet is not None:
            await self._fleet.fleet.set_mode(mode, observe_organizations)
        self._safety.mode, self._safety.observe_organizations = mode, observe_organizations
        detail = {"operator": operator, "mode": str(mode), "observeOrganizations": sorted(observe_organizations)}
        await self._incidents.record(None, "mode.changed", detail, None)
