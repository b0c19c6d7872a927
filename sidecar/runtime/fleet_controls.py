"""The fleet's operator side (FleetDecider's base): closes claimed in the database so exactly one replica
closes, the breaker and the mode stored there and read back by every replica, and closes a replica left behind
taken over once their lease has expired."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from sidecar.ports import FleetState
from sidecar.rules.policy import Close, OperatorClose, Phase, SessionState, Transition, decide
from sidecar.rules.records import CloseTrigger, ClosureRecord, NotificationEvent, PhoneRef
from sidecar.rules.safety import BreakerStatus, Mode
from sidecar.runtime.decider import DecisionTools
from sidecar.runtime.errors import InvalidInput, UnknownSession
from sidecar.runtime.operator import CloseOutcome, all_done, closed_outcome, last_closure, mode_detail
from sidecar.runtime.outcomes import span_ids
from sidecar.runtime.safety_state import SafetyView

TAKE_OVER_LIMIT = 50  # closes left behind, taken over per round

log = logging.getLogger("sidecar.fleet")


class FleetControls:
    def __init__(self, tools: DecisionTools, shared: FleetState) -> None:
        self.fleet = shared
        self._parts = parts = tools.parts
        self._engine = tools.effects
        self._policy = parts.policy
        self._registry = parts.registry
        self._closes = tools.closes
        self._incidents = tools.incidents
        self._store = tools.store
        self._safety = parts.safety
        self._now = parts.now
        self.breaker_tripped = False  # the fleet's, as last read (metrics)

    async def claim_operator_close(self, phone: PhoneRef, reason: str, held_only: bool = False) -> bool:
        """Claim a close for the operator; False when another replica (or an earlier call) already did."""
        claimed: tuple[SessionState, Transition, int] | None = None
        async with self.fleet.deciding([phone], None, wait=True) as batch:
            before = batch.stored(phone.organization_phone_id).state
            if before.phase in (Phase.ACTIVE, Phase.HELD) and not (held_only and before.phase is not Phase.HELD):
                transition = decide(before, OperatorClose(reason), self._policy)
                if isinstance(transition.decision, Close):
                    close = (transition.decision, CloseTrigger.OPERATOR)
                    claimed = before, transition, batch.save(phone, transition.state, None, close)
        if claimed is None:
            return False
        before, transition, generation = claimed
        session = self._registry.ensure(phone)
        self._engine.carry_out(session, before, transition, CloseTrigger.OPERATOR, None, generation)
        return True

    async def phone_of(self, organization_phone_id: int) -> tuple[PhoneRef, Phase] | None:
        stored = await self.fleet.stored(organization_phone_id)
        if stored is None or stored.phone is None:
            return None
        return stored.phone, stored.state.phase

    async def close_held(self, reason: str) -> list[Awaitable[ClosureRecord]]:
        tasks: list[Awaitable[ClosureRecord]] = []
        for phone in await self.fleet.held_phones():
            if await self.claim_operator_close(phone, reason, held_only=True):
                task = self._closes.in_flight(phone.organization_phone_id)
                if task is not None:
                    tasks.append(task)
        return tasks

    # Fleet settings -----------------------------------------------------------------------------------

    async def refresh_settings(self) -> None:
        settings = await self.fleet.settings()
        self._safety.mode, self._safety.observe_organizations = settings.mode, settings.observe_organizations
        self.breaker_tripped = settings.breaker_tripped_at is not None

    async def take_over_closes(self) -> int:
        running = self._closes.in_flight_phones()
        if running:
            await self.fleet.renew_closes(running)  # a slow close of ours is not taken over
        claimed = await self.fleet.take_over_closes(TAKE_OVER_LIMIT)
        for item in claimed:
            log.warning(
                "finishing a close another replica left behind",
                extra={"fields": {"organizationPhoneId": item.phone.organization_phone_id, "gen": item.generation}},
            )
            session = self._registry.ensure(item.phone)
            session.state = SessionState(item.close.counters, Phase.CLOSING)
            self._closes.start(session, item.close, item.trigger, item.generation)
        return len(claimed)

    # Operators ----------------------------------------------------------------------------------------

    async def force_close(self, organization_phone_id: int, reason: str) -> CloseOutcome:
        """The close is claimed in the database: exactly one replica closes; the others answer alreadyClosed."""
        running = self._closes.in_flight(organization_phone_id)
        if running is not None:
            await asyncio.shield(running)
            return closed_outcome(running.result(), already_closed=True)
        session = self._registry.get(organization_phone_id)
        found = await self.phone_of(organization_phone_id)
        if found is None and session is None:
            raise UnknownSession(organization_phone_id)
        if found is not None and found[1] in (Phase.CLOSING, Phase.CLOSED):
            return CloseOutcome(await last_closure(self._store, organization_phone_id), already_closed=True)
        phone = session.phone if session is not None else found[0] if found is not None else None
        assert phone is not None
        with self._parts.tracer.start_as_current_span("session.force_close", attributes=span_ids(phone)):
            claimed = await self.claim_operator_close(phone, reason)
        started = self._closes.in_flight(organization_phone_id)
        if not claimed or started is None:
            return CloseOutcome(await last_closure(self._store, organization_phone_id), already_closed=True)
        return closed_outcome(await asyncio.shield(started), already_closed=False)

    async def breaker_status(self) -> BreakerStatus:
        return await self.fleet.breaker_status()

    async def safety_view(self) -> SafetyView:
        """Read from the database: every replica answers the same."""
        await self.refresh_settings()
        safety = self._safety
        status = await self.breaker_status()
        return SafetyView(status, safety.breaker.config, safety.mode, safety.observe_organizations)

    async def release_breaker(self, operator: str, close_held: bool) -> list[ClosureRecord]:
        await self.fleet.release_breaker()
        self._safety.restarts.release()  # this replica's deaf-session restarts resume too
        await self.refresh_settings()
        held = (await self.breaker_status()).held
        detail = {"operator": operator, "closeHeld": close_held, "held": held}
        await self._incidents.record(None, "breaker.released", detail, NotificationEvent.BREAKER_RELEASED)
        if not close_held:
            return []
        tasks = await self.close_held(f"held by the circuit breaker; closed on release by {operator}")
        return all_done(await asyncio.gather(*tasks))

    async def keep_breaker(self, operator: str) -> None:
        if not await self.fleet.keep_breaker(operator):
            raise InvalidInput("action", "keep applies to a tripped breaker; it is not tripped")
        await self._incidents.record(None, "breaker.kept", {"operator": operator}, None)

    async def trip_breaker(self, operator: str) -> None:
        fresh = await self.fleet.trip_breaker(operator)
        await self.refresh_settings()
        if fresh:
            detail = {"operator": operator}
            await self._incidents.record(None, "breaker.tripped", detail, NotificationEvent.BREAKER_TRIPPED)

    async def set_mode(self, mode: Mode, observe_organizations: frozenset[int], operator: str) -> None:
        await self.fleet.set_mode(mode, observe_organizations)
        self._safety.mode, self._safety.observe_organizations = mode, observe_organizations
        await self._incidents.record(None, "mode.changed", mode_detail(mode, observe_organizations, operator), None)
