"""Restrictions (`account.restriction`): the book of what is in force here (rules/restrictions.py), and the
number's timeline in the store, with its owner notifications, written by `RecordRestriction` steps through the
ordered step queue (durable, as every other change). Nothing here closes a session or deletes a key.

Fleet mode: each replica keeps the restrictions of the events it takes, and loads the ones the shared timeline
holds in force at start. Whether a change is news is decided by the store against the shared timeline, so two
replicas that record the same restriction (a phone that moved, a lock whose `until` both saw pass) write one
history row and send one webhook.
"""

from __future__ import annotations

from datetime import datetime

from sidecar.events.schema import AccountRestriction
from sidecar.ports import RestrictionEntry, RestrictionTimeline
from sidecar.rules.inputs import phone_ref
from sidecar.rules.records import NotificationEvent, PhoneRef, RecordRestriction
from sidecar.rules.restrictions import Change, Restriction, RestrictionBook, RestrictionKind, held_for
from sidecar.runtime.parts import RuntimeParts


class Restrictions:
    def __init__(self, parts: RuntimeParts, book: RestrictionBook | None = None) -> None:
        self._parts = parts
        self._book = book or RestrictionBook()
        self._phones: dict[int, PhoneRef] = {}

    async def report(self, event: AccountRestriction) -> Change:
        """One runtime report; returns what it changed here (the timeline decides what is news)."""
        phone = phone_ref(event.organization_id, event.organization_phone_id, event.phone_jid)
        now = self._parts.now()
        restriction = held_for(Restriction(
            RestrictionKind(event.kind),
            event.active,
            event.at.timestamp() if event.at is not None else now,
            event.until.timestamp() if event.until is not None else None,
            event.code,
            event.detail,
        ))  # fmt: skip
        change = self._book.report(phone.organization_phone_id, restriction, now)
        if change is Change.NONE:
            return change
        self._phones[phone.organization_phone_id] = phone
        await self._record(phone, restriction, change)
        return change

    async def expire(self) -> int:
        """Lift the restrictions whose `until` has passed (a time lock ends by itself); returns how many."""
        now = self._parts.now()
        ended = self._book.expired(now)
        for phone_id, restriction in ended:
            phone = self._phones.get(phone_id) or PhoneRef(0, phone_id)
            lifted = Restriction(restriction.kind, False, now, restriction.until, restriction.code, restriction.detail)
            await self._record(phone, lifted, Change.LIFTED)
        return len(ended)

    async def connection_opened(self, phone: PhoneRef) -> int:
        """The number's connection opened: a ban, a 403 or a 405 it had is over (rules ENDED_BY_OPEN)."""
        now = self._parts.now()
        ended = self._book.opened(phone.organization_phone_id)
        for restriction in ended:
            lifted = Restriction(restriction.kind, False, now, restriction.until, restriction.code, restriction.detail)
            await self._record(self._phones.get(phone.organization_phone_id) or phone, lifted, Change.LIFTED)
        return len(ended)

    async def restore(self, timeline: RestrictionTimeline) -> int:
        """Load what the timeline holds in force (a restart, or another replica's restrictions)."""
        held = await timeline.restrictions_in_force()
        for entry in held:
            self._load(entry)
        return len(held)

    def restricted(self) -> list[tuple[PhoneRef, Restriction]]:
        """Every restriction in force here, by session then kind (the per-session gauge)."""
        now = self._parts.now()
        return [(self._phones.get(p) or PhoneRef(0, p), r) for p, r in self._book.restricted(now)]

    def of(self, organization_phone_id: int) -> list[Restriction]:
        return self._book.of(organization_phone_id, self._parts.now())

    def forget(self, organization_phone_id: int) -> None:
        """The session's state expired (--state-ttl): what is in force stays on the timeline."""
        if not self._book.of(organization_phone_id, self._parts.now()):
            self._book.forget(organization_phone_id)
            self._phones.pop(organization_phone_id, None)

    def __len__(self) -> int:
        return len(self._book)

    def _load(self, entry: RestrictionEntry) -> None:
        try:
            kind = RestrictionKind(entry.kind)
        except ValueError:
            return  # a kind a later release knows
        until = entry.until.timestamp() if isinstance(entry.until, datetime) else None
        restriction = Restriction(kind, True, entry.at.timestamp(), until, entry.code, entry.detail)
        self._book.load(entry.organization_phone_id, restriction)
        self._phones.setdefault(
            entry.organization_phone_id, PhoneRef(entry.organization_id, entry.organization_phone_id)
        )

    async def _record(self, phone: PhoneRef, restriction: Restriction, change: Change) -> None:
        for observer in self._parts.observers:
            observer.restriction_changed(phone, restriction, str(change))
        # Attached to every change: the store enqueues it only for news (an update of a lock the timeline held as
        # ended is a new restriction there).
        event = NotificationEvent.RESTRICTED if restriction.active else NotificationEvent.RESTRICTION_LIFTED
        stats = dict(self._parts.stats_of(phone))
        notification = self._parts.notices.notification(event, stats, str(restriction.kind))
        await self._parts.steps.submit(RecordRestriction(phone, restriction, notification))
