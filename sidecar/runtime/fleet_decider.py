"""The fleet's Decider (runtime/decider.py): every decision is taken inside a database transaction on the state
the database returns (ports.FleetState), so any number of replicas act as one sidecar.

Events wait for their decision in the DecisionQueue (ordered, bounded, journaled, failing closed while PostgreSQL
is away); this module decides a batch of them in one transaction and carries the decisions out, and answers the
fleet-wide queries and the operators' actions (closes claimed in the database, the breaker and mode stored there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from opentelemetry import context as otel_context

from sidecar.ports import FleetState, JournalProgress, StoredDecision, StoredSession, StoreUnavailable
from sidecar.retrying import RetryLog
from sidecar.rules.policy import (
    Close,
    ConnectionClosed,
    ConnectionOpened,
    ErrorStats,
    Event,
    Hold,
    Phase,
    SessionState,
    Transition,
    decide,
    error_stats,
)
from sidecar.rules.records import (
    CloseTrigger,
    CounterKind,
    Notification,
    PhoneRef,
)
from sidecar.rules.safety import IncidentKind, LoopState, Mode, is_reconnect_after_logout, on_close
from sidecar.runtime.decider import DecisionTools
from sidecar.runtime.decision_queue import DecisionQueue
from sidecar.runtime.errors import UnknownSession
from sidecar.runtime.fleet_controls import FleetControls
from sidecar.runtime.incidents import INCIDENT_EVENTS
from sidecar.runtime.registry import LoggedOut, Session
from sidecar.runtime.safety_state import needs_admission
from sidecar.runtime.waiting import EventJournal, Result, Traced, Waiting

log = logging.getLogger("sidecar.fleet")

SETTINGS_REFRESH_SECONDS = 0.5
SEED_RETRY_SECONDS = 1.0


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


class FleetDecider(FleetControls):
    decides_later = True  # at the end of a batch: a decrypt error's span stays open until its decision

    def __init__(
        self,
        tools: DecisionTools,
        shared: FleetState,
        *,
        seed_settings: tuple[Mode, frozenset[int]],
        backlog_limit: int,
        journal: EventJournal | None = None,
        on_dropped: Callable[[str], None] | None = None,
        on_decided: Callable[[], None] | None = None,
    ) -> None:
        """`seed_settings`: this replica's mode flags, stored as the fleet's when the fleet has not seen them."""
        super().__init__(tools, shared)
        self._seed_settings = seed_settings
        self._collecting: list[Waiting] | None = None
        self.queue = DecisionQueue(self._decide, backlog_limit, journal, on_dropped, on_decided)

    @property
    def backlog(self) -> int:
        return self.queue.backlog

    @property
    def oldest_undecided_age(self) -> float:
        return self.queue.oldest_age

    @property
    def unavailable_reason(self) -> str | None:
        return self.queue.unavailable_reason

    @property
    def stalled_reason(self) -> str | None:
        return self.queue.stalled_reason

    def durable_mark(self) -> int:
        return self.queue.accepted_mark

    async def until_durable(self, mark: int) -> None:
        await self.queue.until_durable(mark)

    @property
    def parked_phones(self) -> int:
        return self.queue.parked_phones

    async def start(self) -> int:
        return await self.queue.replay()

    async def stop(self) -> None:
        await self.queue.stop()

    def restore(self, stored: Sequence[StoredSession]) -> None:
        """Every decision reads the database; this only fills the read cache (stats, sessions, metrics)."""
        self._registry.warm(stored)

    def background(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {"fleet-settings": self._follow_settings}

    async def _follow_settings(self) -> None:
        """Seed the fleet's mode from this replica's flags if none is stored yet; then mode and breaker changes
        made through any replica apply here within SETTINGS_REFRESH_SECONDS, and closes left behind by a replica
        that stopped mid-close are finished here once their lease has expired."""
        retries = RetryLog(log, "read the fleet settings")
        while True:
            try:
                await self.fleet.seed_settings(*self._seed_settings)
                retries.succeeded()
                break
            except StoreUnavailable as error:
                retries.failed(error)
                await asyncio.sleep(SEED_RETRY_SECONDS)
        while True:
            try:
                await self.refresh_settings()
                await self.take_over_closes()
            except StoreUnavailable as error:
                self.queue.unavailable(error)
            else:
                self.queue.reachable()
            await asyncio.sleep(SETTINGS_REFRESH_SECONDS)

    # Events -------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def batch(self, origin: tuple[str, int] | None = None) -> AsyncIterator[None]:
        """Events applied inside (one frame, one HTTP body) are decided together at the end, in order, one
        transaction per BATCH_SIZE events, instead of one transaction each. `origin` rides on the last one."""
        if self._collecting is not None:
            yield
            return
        self._collecting = []
        try:
            yield
        finally:
            items, self._collecting = self._collecting, None
            if origin is not None and items:
                items[-1] = replace(items[-1], origin=origin)
            await self.queue.submit(items)

    async def apply(
        self, phone: PhoneRef, event: Event, counted: CounterKind | None, now: float, traced: Traced | None
    ) -> Result:
        item = Waiting(phone, event, counted, now, traced=traced)
        if self._collecting is not None:
            self._collecting.append(item)
            return True, None
        results = await self.queue.submit([item])
        return results[0] if results else (True, None)  # waiting for the database: the session continues

    async def closed(self, phone: PhoneRef, now: float, status_code: int | None) -> None:
        """Reconnect loops are detected in the decision, on the history every replica shares."""
        await self.apply(phone, ConnectionClosed(status_code), None, now, None)

    def steady(self, organization_phone_id: int) -> Session | None:
        return None  # every open is decided in the shared transaction (the counters live in the database)

    async def opened(self, phone: PhoneRef, now: float, new_login: bool) -> None:
        item = Waiting(phone, ConnectionOpened(), None, now, new_login)
        if self._collecting is not None:
            self._collecting.append(item)
        else:
            await self.queue.submit([item])

    async def _decide(self, chunk: list[tuple[Waiting, int]], journal: JournalProgress | None) -> list[Result | None]:
        """One transaction for the batch; None for the events of a phone whose row (or, for a close, the breaker's
        lock) another PostgreSQL session holds: the queue parks them and the rest are decided without waiting."""
        outcomes: list[_Outcome | None] = []
        async with self.fleet.deciding([item.phone for item, _ in chunk], journal) as batch:
            current: dict[int, SessionState] = {}
            loops: dict[int, LoopState] = {}
            busy = set(batch.busy)
            for item, position in chunk:
                phone_id = item.phone.organization_phone_id
                if phone_id in busy:
                    outcomes.append(None)  # and every later event of the phone: its events stay in order
                    continue
                if batch.already_decided(position):
                    outcomes.append(_Outcome(item, skipped=True))  # decided before a crash outlived by its line
                    continue
                stored = batch.stored(phone_id)
                before = current.get(phone_id, stored.state)
                outcome = _Outcome(item, before)
                opening = isinstance(item.event, ConnectionOpened)
                if before.phase is Phase.CLOSED and opening and self._did_not_stick(stored, item):
                    outcome.stick_seconds = item.at - (stored.logged_out_at or item.at)
                    outcomes.append(outcome)
                    continue
                if before.phase is Phase.CLOSED and not opening:
                    outcome.logged_out = (stored.logged_out_at, stored.logged_out_observed)
                    outcomes.append(outcome)
                    continue  # closed by some replica and not opened since: errors change nothing
                trigger = _trigger(item)
                transition = decide(before, item.event, self._policy)
                if needs_admission(transition, trigger):
                    admission = await batch.admit_automatic_close(item.phone)
                    if admission is None:  # the breaker's lock is held elsewhere: this close is retried
                        busy.add(phone_id)
                        outcomes.append(None)
                        continue
                    admitted, outcome.just_tripped = admission
                    if not admitted:
                        transition = decide(before, item.event, self._policy, automatic_closes_allowed=False)
                if isinstance(item.event, ConnectionClosed):  # loops seen by every replica
                    state = loops.get(phone_id, stored.loops)
                    config = self._safety.loops.config
                    loops[phone_id], outcome.incidents = on_close(state, item.at, item.event.status_code, config)
                    batch.save_loops(item.phone, loops[phone_id])
                outcome.transition = transition
                outcome.flip = self._engine.health_flip(before, transition.state)
                close = (transition.decision, trigger) if isinstance(transition.decision, Close) else None
                outcome.generation = batch.save(item.phone, transition.state, outcome.flip, close)
                current[phone_id] = transition.state
                outcomes.append(outcome)
            batch.decided(
                frozenset(position for (_, position), o in zip(chunk, outcomes, strict=True) if o is not None)
            )
            taken: dict[str, int] = {}
            for (item, _), done in zip(chunk, outcomes, strict=True):
                if item.origin is not None and done is not None:
                    key, seq = item.origin
                    taken[key] = max(seq, taken.get(key, 0))
            batch.taken(taken)
        # Committed: the decisions stand fleet-wide; carry them out here, in order.
        return [await self._carry_out_traced(outcome) if outcome is not None else None for outcome in outcomes]

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
        tripped = await self.breaker_status() if outcome.just_tripped else None
        await self._engine.after_decision(session.phone, transition.decision, tripped)
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


def _trigger(item: Waiting) -> CloseTrigger:
    return CloseTrigger.AUTOMATIC if item.counted is not None else CloseTrigger.CONNECTION
