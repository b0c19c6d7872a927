"""Message loss as a measured SLI: a message that failed to decrypt is pending until it is recovered (re-sent after
a retry receipt, or a placeholder resend from the phone) or its deadline passes; only the latter is lost. Pure:
the caller gives the time.

Bounded: at most `per_session` pending ids per session. An id beyond the bound is not tracked, and counted as
`unknown` (neither recovered nor lost can be said of it), never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

# Baileys retries a failed message with up to 5 retry receipts within seconds (maxMsgRetryCount 5), then asks the
# phone for a placeholder resend that it gives up on after 8 s; whatsmeow sends its retry receipts at once and
# asks the phone after 5 s. Both are done within a minute while the sender is online; five minutes also covers a
# sender that was briefly away. Past that, what did not arrive is lost.
DEFAULT_DEADLINE_SECONDS: Final = 300.0
DEFAULT_PER_SESSION: Final = 1000


class Outcome(StrEnum):
    PENDING = "pending"  # tracked until recovered or its deadline passes
    REPEATED = "repeated"  # the same id failed again (a retry that failed too): still one message
    UNKNOWN = "unknown"  # beyond the session's bound: not tracked


@dataclass(frozen=True, slots=True)
class Deferred:
    """A Bad MAC the loss-aware policy counts only if its message is lost (its failing peer, for the record)."""

    peer_user: str | None


@dataclass(frozen=True, slots=True)
class Lost:
    organization_phone_id: int
    message_id: str
    deferred: Deferred | None = None  # the Bad MAC to count now


class LossTracker:
    """Pending failures per session, oldest first; the lost count per session since it was first seen."""

    def __init__(self, deadline: float = DEFAULT_DEADLINE_SECONDS, per_session: int = DEFAULT_PER_SESSION) -> None:
        self.deadline = deadline
        self.per_session = per_session
        # id -> deadline per session; dicts keep insertion order: oldest first. Floats only, so the garbage
        # collector does not track these dicts (a flood of ids costs it nothing); the deferred Bad MACs (loss-aware)
        # are kept apart.
        self._pending: dict[int, dict[str, float]] = {}
        self._deferred: dict[tuple[int, str], Deferred] = {}
        self._lost: dict[int, int] = {}

    def failed(
        self, organization_phone_id: int, message_id: str, now: float, deferred: Deferred | None = None
    ) -> Outcome:
        (outcome,), _ = self.failed_batch([(organization_phone_id, message_id)], now)
        if deferred is not None and outcome is Outcome.PENDING:
            self._deferred[organization_phone_id, message_id] = deferred
        return outcome

    def failed_batch(self, failures: list[tuple[int, str]], now: float) -> tuple[list[Outcome], list[int]]:
        """`failed` for one batch's (session, id) pairs, none with a deferred Bad MAC: their outcomes, in order,
        and the sessions that had nothing pending before."""
        deadline, bound, pending_of = now + self.deadline, self.per_session, self._pending
        pending_, repeated, unknown = Outcome.PENDING, Outcome.REPEATED, Outcome.UNKNOWN  # enum lookups are slow
        outcomes: list[Outcome] = []
        fresh: list[int] = []
        add = outcomes.append
        for organization_phone_id, message_id in failures:
            pending = pending_of.get(organization_phone_id)
            if pending is None:
                pending = pending_of[organization_phone_id] = {}
                fresh.append(organization_phone_id)
            elif message_id in pending:
                add(repeated)
                continue
            elif len(pending) >= bound:
                add(unknown)
                continue
            pending[message_id] = deadline
            add(pending_)
        return outcomes, fresh

    def recovered(self, organization_phone_id: int, message_id: str) -> bool:
        """True when the id was pending (a recovery of an unknown or already lost id is False)."""
        pending = self._pending.get(organization_phone_id)
        if pending is None or pending.pop(message_id, None) is None:
            return False
        self._deferred.pop((organization_phone_id, message_id), None)
        if not pending:
            del self._pending[organization_phone_id]
        return True

    def expired(self, now: float) -> list[Lost]:
        """The failures whose deadline passed unrecovered: lost, taken out and counted per session."""
        lost = self.due(now)
        self.count_lost(lost)
        return lost

    def due(self, now: float) -> list[Lost]:
        """The failures whose deadline passed unrecovered, taken out and not counted yet (in fleet mode the shared
        ledger says which of them are lost: another replica may have seen the recovery, or counted it already)."""
        due: list[Lost] = []
        for phone in list(self._pending):
            pending = self._pending[phone]
            while pending:
                message_id, deadline = next(iter(pending.items()))
                if deadline > now:
                    break  # ids are kept in the order they failed, with one deadline: the rest are later
                del pending[message_id]
                due.append(Lost(phone, message_id, self._deferred.pop((phone, message_id), None)))
            if not pending:
                del self._pending[phone]
        return due

    def count_lost(self, lost: list[Lost]) -> None:
        for item in lost:
            self._lost[item.organization_phone_id] = self._lost.get(item.organization_phone_id, 0) + 1

    def lost(self, organization_phone_id: int) -> int:
        return self._lost.get(organization_phone_id, 0)

    def pending(self, organization_phone_id: int) -> int:
        return len(self._pending.get(organization_phone_id, ()))

    def losing(self) -> dict[int, int]:
        """Sessions that lost messages, with their counts."""
        return dict(self._lost)

    def forget(self, organization_phone_id: int) -> None:
        for message_id in self._pending.pop(organization_phone_id, {}):
            self._deferred.pop((organization_phone_id, message_id), None)
        self._lost.pop(organization_phone_id, None)
