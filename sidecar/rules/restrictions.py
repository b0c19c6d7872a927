"""What WhatsApp is doing to a number: the restrictions a runtime reports (`account.restriction`), kept per
session as a book of the ones in force. Pure: the caller gives the time.

A restriction never closes a session and never deletes a key: deleting keys does not lift a restriction, and a
logout makes it worse (the number has to pair again while WhatsApp watches it). The book only says what changed,
so the runtime can record it on the number's timeline and tell the team that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final


class RestrictionKind(StrEnum):
    REACHOUT_TIMELOCK = "reachout_timelock"  # new chats refused until a time (Baileys reachoutTimeLock)
    MESSAGE_CAP = "message_cap"  # new-chat messages capped (Baileys message-capping.update)
    ACK_463 = "ack_463"  # messages refused with 463: account restricted or missing tctoken
    ACK_479 = "ack_479"  # messages refused with 479 smax-invalid
    TEMPORARY_BAN = "temporary_ban"  # the account is banned for a while (whatsmeow TemporaryBan)
    FORBIDDEN = "forbidden"  # the connection closed with 403
    CLIENT_OUTDATED = "client_outdated"  # the connection closed with 405: the client version is refused


# A refused message (an ack with error 463 or 479) says the number is restricted now, and nothing says when it
# stops: it is held in force for an hour after the last refusal, then lifts by itself. A refusal within a minute of
# the hold's last extension changes nothing (a bulk send refused a thousand times is one restriction, not a
# thousand writes).
REFUSALS: Final = frozenset({RestrictionKind.ACK_463, RestrictionKind.ACK_479})
REFUSAL_HOLD_SECONDS: Final = 3600.0
REFUSAL_REFRESH_SECONDS: Final = 60.0
# A connection that opens is not banned, forbidden or outdated (any more): these end when the number's connection
# opens again.
ENDED_BY_OPEN: Final = frozenset(
    {RestrictionKind.TEMPORARY_BAN, RestrictionKind.FORBIDDEN, RestrictionKind.CLIENT_OUTDATED}
)


class Change(StrEnum):
    STARTED = "started"  # not in force before
    UPDATED = "updated"  # in force, with a new `until`, code or detail
    LIFTED = "lifted"  # was in force (or may be, as far as the timeline knows), now not
    NONE = "none"  # the same as the book holds


@dataclass(frozen=True, slots=True)
class Restriction:
    """One restriction as reported; `until` (epoch seconds) ends it by itself."""

    kind: RestrictionKind
    active: bool
    at: float  # when the runtime saw it (or the sidecar took it)
    until: float | None = None
    code: int | None = None
    detail: str | None = None

    def in_force(self, now: float) -> bool:
        return self.active and (self.until is None or self.until > now)


class RestrictionBook:
    """The restrictions in force, per session and kind, as this process knows them. Bounded by what runtimes
    report: a session has at most one entry per kind, and a session's entries go when it is forgotten."""

    def __init__(self) -> None:
        self._held: dict[int, dict[RestrictionKind, Restriction]] = {}

    def report(self, organization_phone_id: int, restriction: Restriction, now: float) -> Change:
        """Take one report; what it changes. A report that is not in force (lifted, or a time lock whose `until`
        has passed) is LIFTED even when the book holds nothing: the timeline, shared by replicas, may hold it."""
        restriction = held_for(restriction)
        held = self._held.get(organization_phone_id, {})
        before = held.get(restriction.kind)
        if not restriction.in_force(now):
            if before is not None:
                del held[restriction.kind]
                if not held:
                    del self._held[organization_phone_id]
            return Change.LIFTED
        self._held.setdefault(organization_phone_id, {})[restriction.kind] = (
            restriction if before is None else _kept_since(before, restriction)
        )
        if before is None:
            return Change.STARTED
        if _refreshed_soon(before, restriction):
            held[restriction.kind] = before
            return Change.NONE
        if (before.until, before.code, before.detail) != (restriction.until, restriction.code, restriction.detail):
            return Change.UPDATED
        return Change.NONE

    def load(self, organization_phone_id: int, restriction: Restriction) -> None:
        """One restriction the timeline holds in force (at start)."""
        self._held.setdefault(organization_phone_id, {})[restriction.kind] = restriction

    def expired(self, now: float) -> list[tuple[int, Restriction]]:
        """The restrictions whose `until` has passed, taken out of the book (to be recorded as lifted)."""
        ended = [
            (phone, restriction)
            for phone, held in self._held.items()
            for restriction in held.values()
            if not restriction.in_force(now)
        ]
        for phone, restriction in ended:
            held = self._held[phone]
            del held[restriction.kind]
            if not held:
                del self._held[phone]
        return ended

    def opened(self, organization_phone_id: int) -> list[Restriction]:
        """The number's connection opened: the restrictions that ends (ENDED_BY_OPEN), taken out of the book."""
        held = self._held.get(organization_phone_id, {})
        ended = [held.pop(kind) for kind in sorted(ENDED_BY_OPEN & held.keys())]
        if not held:
            self._held.pop(organization_phone_id, None)
        return ended

    def of(self, organization_phone_id: int, now: float) -> list[Restriction]:
        held = self._held.get(organization_phone_id, {})
        return sorted((r for r in held.values() if r.in_force(now)), key=lambda r: r.kind)

    def restricted(self, now: float) -> list[tuple[int, Restriction]]:
        """Every restriction in force, by session then kind."""
        return [(phone, r) for phone in sorted(self._held) for r in self.of(phone, now)]

    def forget(self, organization_phone_id: int) -> None:
        self._held.pop(organization_phone_id, None)

    def __len__(self) -> int:
        return sum(len(held) for held in self._held.values())


def held_for(restriction: Restriction) -> Restriction:
    """A refusal without an end is held for REFUSAL_HOLD_SECONDS after it; everything else as reported."""
    if restriction.kind in REFUSALS and restriction.active and restriction.until is None:
        return replace(restriction, until=restriction.at + REFUSAL_HOLD_SECONDS)
    return restriction


def _refreshed_soon(before: Restriction, now: Restriction) -> bool:
    """Another refusal, the same as the one held, within REFUSAL_REFRESH_SECONDS of the hold's extension."""
    if now.kind not in REFUSALS or (before.code, before.detail) != (now.code, now.detail):
        return False
    return before.until is not None and now.until is not None and now.until - before.until < REFUSAL_REFRESH_SECONDS


def _kept_since(before: Restriction, now: Restriction) -> Restriction:
    """A restriction reported again while in force keeps the time it started."""
    return Restriction(now.kind, True, before.at, now.until, now.code, now.detail)
