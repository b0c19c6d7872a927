"""The embedded store's restriction timeline: the restrictions in force and a bounded recent history, in process
memory. The same rules as PostgreSQL's (store/step_writer.py): news is a restriction not in force before, or one
in force lifted; only news is written to the history and notified."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from sidecar.ports import RestrictionEntry, RestrictionQuery
from sidecar.rules.records import Notification, PhoneRef, RecordRestriction, restriction_details
from sidecar.rules.restrictions import Restriction

HISTORY = 10_000


def entry(phone: PhoneRef, restriction: Restriction, seq: int = 0) -> RestrictionEntry:
    return RestrictionEntry.of(phone, restriction, seq)


class MemoryRestrictions:
    def __init__(
        self, clock: Callable[[], datetime], enqueue: Callable[[PhoneRef, Notification | None, dict[str, Any]], None]
    ) -> None:
        self._clock = clock
        self._enqueue = enqueue
        self.in_force: dict[tuple[int, str], RestrictionEntry] = {}
        self.history: deque[RestrictionEntry] = deque(maxlen=HISTORY)
        self._seq = 0

    def record(self, step: RecordRestriction) -> int:
        phone, restriction = step.phone, step.restriction
        key = (phone.organization_phone_id, str(restriction.kind))
        before = self.in_force.get(key)
        started = entry(phone, restriction)
        was_in_force = before is not None and (before.until is None or before.until > started.at)
        if restriction.active:
            kept_since = before.at if before is not None and was_in_force else started.at
            self.in_force[key] = replace(started, at=kept_since)
            news = not was_in_force
        else:
            news = self.in_force.pop(key, None) is not None
        if news:
            self._seq += 1
            self.history.append(entry(phone, restriction, self._seq))
            self._enqueue(phone, step.notification, restriction_details(restriction))
        return int(news)

    def prune(self, cutoff: datetime) -> int:
        old = 0
        while self.history and self.history[0].at < cutoff:
            self.history.popleft()
            old += 1
        return old

    async def restrictions_in_force(self) -> list[RestrictionEntry]:
        return list(self.in_force.values())

    async def phone_restrictions(
        self, organization_phone_id: int, history: int
    ) -> tuple[list[RestrictionEntry], list[RestrictionEntry]]:
        now = self._clock()
        current = sorted(
            (e for (phone, _), e in self.in_force.items() if phone == organization_phone_id and _in_force(e, now)),
            key=lambda e: e.kind,
        )
        past = [e for e in reversed(self.history) if e.organization_phone_id == organization_phone_id][:history]
        return current, past

    async def list_restrictions(self, query: RestrictionQuery) -> list[RestrictionEntry]:
        now = self._clock()
        if query.active:
            found = sorted(
                (e for e in self.in_force.values() if _in_force(e, now) and _matches(e, query)),
                key=lambda e: (e.organization_phone_id, e.kind),
            )
            if query.after is not None:
                found = [e for e in found if (e.organization_phone_id, e.kind) > query.after]
            return found[: query.limit]
        past = (e for e in reversed(self.history) if _matches(e, query))
        return [e for e in past if query.before is None or e.seq < query.before][: query.limit]


def _in_force(e: RestrictionEntry, now: datetime) -> bool:
    return e.until is None or e.until > now


def _matches(e: RestrictionEntry, query: RestrictionQuery) -> bool:
    return (query.organization_id is None or e.organization_id == query.organization_id) and (
        query.kind is None or e.kind == query.kind
    )
