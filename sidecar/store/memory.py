"""The embedded store: everything in process memory. The default without a database URL; not durable."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sidecar.jid import InvalidJid, parse_jid
from sidecar.policy import ZERO, Counters
from sidecar.ports import StoredSession
from sidecar.records import (
    ClosureRecord,
    CounterKind,
    DeleteKeys,
    IncrementCounter,
    Logout,
    LogoutResult,
    PhoneRef,
    ResetCounters,
    Step,
    StepOutcome,
    StepResult,
)


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


class MemoryStore:
    def __init__(self, clock: Callable[[], datetime], logged_out_status: str = "logged_out") -> None:
        self._clock = clock
        self._logged_out_status = logged_out_status
        self.auth_keys: dict[tuple[int, str], dict[str, str]] = {}
        self.phones: dict[int, PhoneRow] = {}
        self.counters: dict[int, CounterRow] = {}
        self.closures: list[ClosureRecord] = []

    async def apply(self, steps: Sequence[Step], journal: tuple[str, Sequence[int]] | None = None) -> list[StepResult]:
        return [self._apply_one(step) for step in steps]

    async def applied_journal_position(self, instance_id: str) -> int:
        return 0

    async def load_sessions(self) -> list[StoredSession]:
        return [StoredSession(row.phone, row.counters, row.closed) for row in self.counters.values()]

    async def recent_closures(self, organization_phone_id: int, limit: int) -> list[ClosureRecord]:
        mine = [r for r in self.closures if r.phone.organization_phone_id == organization_phone_id]
        return mine[-limit:][::-1]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _apply_one(self, step: Step) -> StepResult:
        if isinstance(step, IncrementCounter):
            row = self.counters.setdefault(step.phone.organization_phone_id, CounterRow(step.phone))
            field = "bad_mac_errors" if step.kind is CounterKind.BAD_MAC else "bad_decrypt_errors"
            row.counters = replace(row.counters, **{field: getattr(row.counters, field) + 1})
            return None
        if isinstance(step, ResetCounters):
            self.counters[step.phone.organization_phone_id] = CounterRow(step.phone)
            return None
        if isinstance(step, DeleteKeys):
            return self._delete_keys(step.phone, step.key_prefixes)
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

    def _delete_keys(self, phone: PhoneRef, prefixes: Sequence[str] | None) -> int:
        user = self._bare_number(phone)
        keys = self.auth_keys.get((phone.organization_id, user)) if user else None
        if not keys:
            return 0
        doomed = [key for key in keys if prefixes is None or key.startswith(tuple(prefixes))]
        for key in doomed:
            del keys[key]
        return len(doomed)

    def _logout(self, step: Logout) -> LogoutResult:
        record = step.record
        phone = record.phone
        steps = dict(record.steps)
        started = time.time_ns()
        keys_deleted = self._delete_keys(phone, None)
        steps["authKeys"] = StepOutcome.OK
        row = self.phones.get(phone.organization_phone_id)
        if row is None:
            steps["phoneStatus"] = "skipped: phone not found"
        else:
            row.status, row.qr_code, row.last_connected_at = self._logged_out_status, None, self._clock()
            steps["phoneStatus"] = StepOutcome.OK
        steps["closureRecord"] = StepOutcome.OK
        steps["counters"] = StepOutcome.OK
        self.counters[phone.organization_phone_id] = CounterRow(phone, ZERO, closed=True)
        duration = (self._clock() - record.started_at).total_seconds()
        self.closures.append(replace(record, keys_deleted=keys_deleted, steps=steps, duration_seconds=duration))
        span = (started, time.time_ns())
        return LogoutResult(keys_deleted, steps, dict.fromkeys(("authKeys", "phoneStatus", "closureRecord"), span))
