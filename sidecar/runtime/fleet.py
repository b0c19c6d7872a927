"""Fleet mode, as the runtime carries it out: every decision is taken inside a database transaction on the
state the database returns (ports.FleetState), so any number of replicas act as one sidecar.

Events wait for their decision in the DecisionQueue (ordered, bounded, journaled, failing closed while PostgreSQL
is away); this module decides a batch of them in one transaction and carries the decisions out, and answers the
fleet-wide queries and operator closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from opentelemetry import context as otel_context

from sidecar.ports import FleetState, StoredDecision, StoreUnavailable
from sidecar.rules.policy import (
    Close,
    ConnectionClosed,
    ConnectionOpened,
    ErrorStats,
    Event,
    Hold,
    OperatorClose,
    Phase,
    PolicyConfig,
    SessionState,
    Transition,
    decide,
    error_stats,
)
from sidecar.rules.records import CloseTrigger, ClosureRecord, CounterKind, Notification, PhoneRef
from sidecar.rules.safety import IncidentKind, LoopState, is_reconnect_after_logout, on_close
from sidecar.runtime.close import CloseSequence
from sidecar.runtime.decision_queue import DecisionQueue
from sidecar.runtime.effects import Effects
from sidecar.runtime.errors import UnknownSession
from sidecar.runtime.fleet_safety import INCIDENT_EVENTS, Incidents, Safety, needs_admission
from sidecar.runtime.registry import LoggedOut, SessionRegistry
from sidecar.runtime.waiting import EventJournal, Result, Traced, Waiting

log = logging.getLogger("sidecar.fleet")

SETTINGS_REFRESH_SECONDS = 0.5
TAKE_OVER_LIMIT = 50  # closes left behind, taken over per round


@dataclass(slots=True)
class _Outcome:
    item: Waiting
    before: SessionState | None = None
    transition: Transition | None = None
    flip: Notification | None = None
    generation: int = 0
    just_tripped: bool = False
    stick_seconds: float | None = None  # an `open` that shows a logout did not stick
    logged_out: tuple[float | None, bool] = (None, False)  # a phone some replica closed: when, observed
    incidents: list[IncidentKind] = field(default_factory=list)  # reconnect loop, conflict (a close with 440)
    skipped: bool = False  # decided by an earlier run (replayed from the journal)


class FleetDecisions:
    def __init__(
        self,
        fleet: FleetState,
        engine: Effects,
        policy: PolicyConfig,
        registry: SessionRegistry,
        closes: CloseSequence,
        incidents: Incidents,
        safety: Safety,
        now: Callable[[], float],
        *,
        backlog_limit: int,
        journal: EventJournal | None = None,
    ) -> None:
        self.fleet = fleet
        self._engine = engine
        self._policy = policy
        self._registry = registry
        self._closes = closes
        self._incidents = incidents
        self._safety = safety
        self._now = now
        self._collecting: list[Waiting] | None = None
        self.queue = DecisionQueue(self._decide, backlog_limit, journal)
        self.breaker_tripped = False  # the fleet's, as last read (metrics)

    @property
    def backlog(self) -> int:
        return self.queue.backlog

    @property
    def unavailable_reason(self) -> str | None:
        return self.queue.unavailable_reason

    async def replay(self) -> int:
        return await self.queue.replay()

    async def stop(self) -> None:
        await self.queue.stop()

    # Events -------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Events applied inside (one frame, one HTTP body) are decided together at the end, in order, one
        transaction per BATCH_SIZE events, instead of one transaction each."""
        if self._collecting is not None:
            yield
            return
        self._collecting = []
        try:
            yield
        finally:
            items, self._collecting = self._collecting, None
            await self.queue.submit(items)

    async def apply(
        self,
        phone: PhoneRef,
        event: Event,
        counted: CounterKind | None,
        now: float | None,
        traced: Traced | None = None,
    ) -> Result:
        item = Waiting(phone, event, counted, now if now is not None else self._now(), traced=traced)
        if self._collecting is not None:
            self._collecting.append(item)
            return True, None
        results = await self.queue.submit([item])
        return results[0] if results else (True, None)  # waiting for the database: the session continues

    async def open(self, phone: PhoneRef, now: float, new_login: bool) -> None:
        item = Waiting(phone, ConnectionOpened(), None, now, new_login)
        if self._collecting is not None:
            self._collecting.append(item)
        else:
            await self.queue.submit([item])

    async def _decide(self, chunk: list[tuple[Waiting, int]], mark: tuple[str, int] | None) -> list[Result]:
        outcomes: list[_Outcome] = []
        async with self.fleet.deciding([item.phone for item, _ in chunk], mark) as batch:
            current: dict[int, SessionState] = {}
            loops: dict[int, LoopState] = {}
            for item, position in chunk:
                if position <= batch.decided_position:
                    outcomes.append(_Outcome(item, skipped=True))  # decided before a crash outlived by its line
                    continue
                phone_id = item.phone.organization_phone_id
                stored = batch.stored(phone_id)
                before = current.get(phone_id, stored.state)
                outcome = _Outcome(item, before)
                outcomes.append(outcome)
                opening = isinstance(item.event, ConnectionOpened)
                if before.phase is Phase.CLOSED and opening and self._did_not_stick(stored, item):
                    outcome.stick_seconds = item.at - (stored.logged_out_at or item.at)
                    continue
                if before.phase is Phase.CLOSED and not opening:
                    outcome.logged_out = (stored.logged_out_at, stored.logged_out_observed)
                    continue  # closed by some replica and not opened since: errors change nothing
                if isinstance(item.event, ConnectionClosed):  # loops seen by every replica
                    state = loops.get(phone_id, stored.loops)
                    config = self._safety.loops.config
                    loops[phone_id], outcome.incidents = on_close(state, item.at, item.event.status_code, config)
                    batch.save_loops(item.phone, loops[phone_id])
                trigger = _trigger(item)
                transition = decide(before, item.event, self._policy)
                if needs_admission(transition, trigger):
                    admitted, outcome.just_tripped = await batch.admit_automatic_close(item.phone, item.at)
                    if not admitted:
                        transition = decide(before, item.event, self._policy, automatic_closes_allowed=False)
                outcome.transition = transition
                outcome.flip = self._engine.health_flip(before, transition.state)
                close = (transition.decision, trigger) if isinstance(transition.decision, Close) else None
                outcome.generation = batch.save(item.phone, transition.state, outcome.flip, close)
                current[phone_id] = transition.state
        # Committed: the decisions stand fleet-wide; carry them out here, in order.
        return [await self._carry_out_traced(outcome) for outcome in outcomes]

    async def _carry_out_traced(self, outcome: _Outcome) -> Result:
        traced = outcome.item.traced
        if traced is None:
            return await self._carry_out(outcome)
        token = otel_context.attach(traced.context)  # effects started now belong to the event's trace
        try:
            result = await self._carry_out(outcome)
            traced.decided(result[0])
            return result
        finally:
            otel_context.detach(token)

    async def _carry_out(self, outcome: _Outcome) -> Result:
        item, transition = outcome.item, outcome.transition
        if outcome.skipped:
            return True, None
        for kind in outcome.incidents:
            assert isinstance(item.event, ConnectionClosed)
            detail = {"statusCode": item.event.status_code}
            await self._incidents.record(item.phone, str(kind), detail, INCIDENT_EVENTS[kind])
        if outcome.stick_seconds is not None:
            await self._incidents.logout_did_not_stick(item.phone, outcome.stick_seconds)
            return False, None
        if transition is None or outcome.before is None:
            self._forget_locally(item.phone, *outcome.logged_out)
            return False, None
        if transition.state.phase is Phase.CLOSING and not isinstance(transition.decision, Close):
            return False, None  # a close is under way (here or elsewhere): nothing to carry out, nothing to keep
        opening = isinstance(item.event, ConnectionOpened)
        if opening:
            self._registry.reopen(item.phone.organization_phone_id)
        session = self._registry.ensure(item.phone)
        if item.counted is not None:
            session.last_error_at = item.at
        if opening:
            self._engine.set_connected(session, True)
        elif isinstance(item.event, ConnectionClosed):
            # Carried out in decision order: an `open` decided after the close was received must not leave
            # the session shown connected.
            self._engine.set_connected(session, False)
        trigger = _trigger(item)
        self._engine.carry_out(session, outcome.before, transition, trigger, outcome.flip, outcome.generation)
        await self._engine.after_decision(session.phone, transition.decision, outcome.just_tripped)
        decided = transition.decision
        return not isinstance(decided, Close | Hold) and transition.state.phase is Phase.ACTIVE, outcome.flip

    def _did_not_stick(self, stored: StoredDecision, item: Waiting) -> bool:
        """An `open` soon after a (real, not observed) logout by any replica, without a new login."""
        return (
            stored.logged_out_at is not None
            and not stored.logged_out_observed
            and is_reconnect_after_logout(
                stored.logged_out_at, item.at, self._safety.logout_stick_seconds, item.new_login
            )
        )

    def _forget_locally(self, phone: PhoneRef, logged_out_at: float | None, observed: bool) -> None:
        """Another replica closed this phone: this replica's copy goes too."""
        session = self._registry.get(phone.organization_phone_id)
        if session is not None and session.state.phase is not Phase.CLOSING:
            self._registry.close_out(session, LoggedOut(logged_out_at or self._now(), observed))

    # Queries and operator closes ----------------------------------------------------------------------

    async def session_error_stats(self, organization_phone_id: int) -> ErrorStats:
        stored = await self.fleet.stored(organization_phone_id)
        if stored is None:
            if self._registry.get(organization_phone_id) is not None:
                return error_stats(SessionState().counters, self._policy.limits)
            raise UnknownSession(organization_phone_id)
        counters = stored.state.counters if stored.state.phase is not Phase.CLOSED else SessionState().counters
        return error_stats(counters, self._policy.limits)

    async def claim_operator_close(self, phone: PhoneRef, reason: str, held_only: bool = False) -> bool:
        """Claim a close for the operator; False when another replica (or an earlier call) already did."""
        claimed: tuple[SessionState, Transition, int] | None = None
        async with self.fleet.deciding([phone], None) as batch:
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

    async def watch_settings(self) -> None:
        """Mode and breaker changes made through any replica apply here within SETTINGS_REFRESH_SECONDS; closes
        left behind by a replica that stopped mid-close are finished here once their lease has expired."""
        while True:
            try:
                await self.refresh_settings()
                await self.take_over_closes()
            except StoreUnavailable as error:
                self.queue.unavailable(error)
            await asyncio.sleep(SETTINGS_REFRESH_SECONDS)

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


def _trigger(item: Waiting) -> CloseTrigger:
    return CloseTrigger.AUTOMATIC if item.counted is not None else CloseTrigger.CONNECTION
