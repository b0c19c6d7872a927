"""The embedded store: everything in process memory. The default without a database URL; not durable."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sidecar.ports import ClosureQuery, OutboxRow, RestrictionEntry, RestrictionQuery, StoredSession
from sidecar.rules.jid import InvalidJid, parse_jid
from sidecar.rules.policy import ZERO, Counters
from sidecar.rules.records import (
    ClosureRecord,
    CounterKind,
    DeleteKeys,
    IncrementCounter,
    Logout,
    LogoutResult,
    Notification,
    PhoneRef,
    RecordDecision,
    RecordRestriction,
    ResetCounters,
    Step,
    StepOutcome,
    StepResult,
    closed_details,
)
from sidecar.store.memory_restrictions import MemoryRestrictions


@dataclass(slots=True)
class PhoneRow:
    organization_id: int
    phone_jid: str
    status: str = "connected"
    qr_code: str | None = None
    last_connected_at: datetime | None = None


@dataclass(slots=True)
class CounterRow:
    phone: PhoneRef
    counters: Counters = ZERO
    closed: bool = False


HISTORY = 10_000


class MemoryStore:
    def __init__(self, clock: Callable[[], datetime], logged_out_status: str = "logged_out") -> None:
        self._clock = clock
        self._logged_out_status = logged_out_status
        self.auth_keys: dict[tuple[int, str], dict[str, str]] = {}
        self.phones: dict[int, PhoneRow] = {}
        self.counters: dict[int, CounterRow] = {}
        # The embedded store is not durable anyway: it keeps a bounded recent history, never a growing log
        # (the --closure-log file is the full record).
        self.closures: deque[ClosureRecord] = deque(maxlen=HISTORY)
        self.decisions: deque[RecordDecision] = deque(maxlen=HISTORY)
        self.outbox: dict[str, OutboxRow] = {}
        self._leases: dict[str, float] = {}
        self._finished: deque[str] = deque()
        self._seq = 0
        self.restrictions = MemoryRestrictions(clock, self._enqueue)

    async def apply(self, steps: Sequence[Step], journal: tuple[str, Sequence[int]] | None = None) -> list[StepResult]:
        return [self._apply_one(step) for step in steps]

    async def applied_journal_position(self, instance_id: str) -> int:
        return 0

    async def load_sessions(self, closed_within: float | None = None) -> list[StoredSession]:
        return [StoredSession(row.phone, row.counters, row.closed) for row in self.counters.values()]

    async def prune(self, older_than: float, batch: int) -> dict[str, int]:
        """Closures are already bounded (the last HISTORY); finished notifications and idle counters go."""
        cutoff = self._clock() - timedelta(seconds=older_than)
        finished = [key for key, row in self.outbox.items() if row.status != "pending" and row.occurred_at < cutoff]
        for key in finished:
            del self.outbox[key]
        idle = [phone_id for phone_id, row in self.counters.items() if not row.closed and row.counters == Counters()]
        for phone_id in idle:
            del self.counters[phone_id]
        history = self.restrictions.prune(cutoff)
        return {"outbox": len(finished), "session_counters": len(idle), "restriction_history": history}

    async def recent_closures(self, organization_phone_id: int, limit: int) -> list[ClosureRecord]:
        mine = [r for r in self.closures if r.phone.organization_phone_id == organization_phone_id]
        return mine[-limit:][::-1]

    async def list_closures(self, query: ClosureQuery) -> list[ClosureRecord]:
        found = sorted(
            (r for r in self.closures if query.matches(r)), key=lambda r: (r.started_at, r.closure_id), reverse=True
        )
        return found[: query.limit]

    async def restrictions_in_force(self) -> list[RestrictionEntry]:
        return await self.restrictions.restrictions_in_force()

    async def phone_restrictions(
        self, organization_phone_id: int, history: int
    ) -> tuple[list[RestrictionEntry], list[RestrictionEntry]]:
        return await self.restrictions.phone_restrictions(organization_phone_id, history)

    async def list_restrictions(self, query: RestrictionQuery) -> list[RestrictionEntry]:
        return await self.restrictions.list_restrictions(query)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _enqueue(self, phone: PhoneRef, notification: Notification | None, details: dict[str, Any]) -> None:
        if notification is None or notification.notification_id in self.outbox:
            return
        self._seq += 1
        self.outbox[notification.notification_id] = OutboxRow(
            notification.notification_id,
            str(notification.event),
            phone.organization_id,
            phone.organization_phone_id,
            notification.occurred_at,
            notification.stats,
            notification.reason,
            details,
            notification.trace_id,
            seq=self._seq,
        )

    async def claim_due(self, limit: int, lease_seconds: float) -> list[OutboxRow]:
        now = time.monotonic()
        claimed: list[OutboxRow] = []
        waiting_phones: set[int] = set()
        for row in sorted(self.outbox.values(), key=lambda r: r.seq):
            if row.status != "pending":
                continue
            if row.organization_phone_id in waiting_phones:
                continue
            waiting_phones.add(row.organization_phone_id)  # later ones of this session wait for this one
            if self._leases.get(row.notification_id, 0.0) <= now and len(claimed) < limit:
                self._leases[row.notification_id] = now + lease_seconds
                claimed.append(row)
        return claimed

    async def finish(
        self,
        notification_id: str,
        status: str,
        attempts: int,
        error: str | None,
        team: str | None,
        retry_in: float | None = None,
    ) -> None:
        row = self.outbox[notification_id]
        row.status, row.attempts, row.last_error, row.team = status, attempts, error, team
        if status == "delivered":
            row.delivered_at = self._clock()
        self._leases[notification_id] = time.monotonic() + (retry_in or 0.0)
        if status != "pending":
            self._leases.pop(notification_id, None)
            self._finished.append(notification_id)
            while len(self._finished) > HISTORY:  # finished rows beyond the recent history go; pending ones never
                self.outbox.pop(self._finished.popleft(), None)

    async def list_notifications(self, status: str | None, limit: int) -> list[OutboxRow]:
        rows = [r for r in sorted(self.outbox.values(), key=lambda r: -r.seq) if status is None or r.status == status]
        return rows[:limit]

    async def outbox_depth(self) -> int:
        return sum(1 for row in self.outbox.values() if row.status == "pending")

    def _apply_one(self, step: Step) -> StepResult:
        if isinstance(step, IncrementCounter | ResetCounters):
            self._enqueue(step.phone, step.notification, {})
        if isinstance(step, IncrementCounter):
            row = self.counters.setdefault(step.phone.organization_phone_id, CounterRow(step.phone))
            field = "bad_mac_errors" if step.kind is CounterKind.BAD_MAC else "bad_decrypt_errors"
            row.counters = replace(row.counters, **{field: getattr(row.counters, field) + 1})
            return None
        if isinstance(step, ResetCounters):
            self.counters[step.phone.organization_phone_id] = CounterRow(step.phone)
            return None
        if isinstance(step, DeleteKeys):
            return self._delete_keys(step.phone, step.key_prefixes, only_count=step.observe)
        if isinstance(step, RecordRestriction):
            return self.restrictions.record(step)
        if isinstance(step, RecordDecision):
            self.decisions.append(step)
            self._enqueue(step.phone or PhoneRef(0, 0), step.notification, step.detail)
            return None
        return self._logout(step)

    def _bare_number(self, phone: PhoneRef) -> str | None:
        if phone.phone_user:
            return phone.phone_user
        row = self.phones.get(phone.organization_phone_id)
        if row is None:
            return None
        try:
            return parse_jid(row.phone_jid).bare
        except InvalidJid:
            return None

    def _delete_keys(self, phone: PhoneRef, prefixes: Sequence[str] | None, only_count: bool = False) -> int:
        user = self._bare_number(phone)
        keys = self.auth_keys.get((phone.organization_id, user)) if user else None
        if not keys:
            return 0
        doomed = [key for key in keys if prefixes is None or key.startswith(tuple(prefixes))]
        if not only_count:
            for key in doomed:
                del keys[key]
        return len(doomed)

    def _logout(self, step: Logout) -> LogoutResult:
        record = step.record
        phone = record.phone
        steps = dict(record.steps)
        started = time.time_ns()
        keys_deleted: int | None = record.keys_deleted
        if not step.keys_given:
            keys_deleted = self._delete_keys(phone, None, only_count=step.observe)
            steps["authKeys"] = StepOutcome.OK
        row = self.phones.get(phone.organization_phone_id)
        if step.observe:
            if not step.keys_given:
                steps["authKeys"] = f"{StepOutcome.SKIPPED}: observe mode, would delete {keys_deleted}"
            steps["phoneStatus"] = f"{StepOutcome.SKIPPED}: observe mode"
            keys_deleted = None
        elif row is None:
            steps["phoneStatus"] = "skipped: phone not found"
        else:
            row.status, row.qr_code, row.last_connected_at = self._logged_out_status, None, self._clock()
            steps["phoneStatus"] = StepOutcome.OK
        steps["closureRecord"] = StepOutcome.OK
        steps["counters"] = StepOutcome.OK
        self.counters[phone.organization_phone_id] = CounterRow(phone, ZERO, closed=True)
        duration = (self._clock() - record.started_at).total_seconds()
        self.closures.append(replace(record, keys_deleted=keys_deleted, steps=steps, duration_seconds=duration))
        self._enqueue(phone, step.notification, closed_details(record, keys_deleted))
        span = (started, time.time_ns())
        return LogoutResult(keys_deleted, steps, dict.fromkeys(("authKeys", "phoneStatus", "closureRecord"), span))
