"""Message loss (rules/loss.py): failures with a `messageId` are pending until a `message.recovered` names them
or `--loss-deadline` passes; the observers count undecryptable, recovered and lost messages, and a session's
first loss is told to its team (`session.losing_messages`).

Fleet mode: a phone's events reach the replica its runtime connection is on, which owns the phone, so a failure
and its recovery are normally seen by the same replica. After a link reconnect to another replica in between,
the old replica counts the failure lost at its deadline and the new one counts the recovery as one of an id it
does not know (`whatsapp_messages_recovered_total`, never lost twice): the share is an upper bound then.
"""

from __future__ import annotations

from sidecar.events.schema import DecryptError, MessageRecovered
from sidecar.rules.inputs import phone_ref
from sidecar.rules.loss import Deferred, LossTracker, Lost, Outcome
from sidecar.rules.records import NotificationEvent, PhoneRef
from sidecar.runtime.parts import RuntimeParts

LOSING_MESSAGES = "session.losing_messages"  # the decision record and the owner webhook of a session's first loss


class MessageLoss:
    def __init__(self, parts: RuntimeParts, tracker: LossTracker | None = None) -> None:
        self._parts = parts
        self._tracker = tracker or LossTracker()
        self._phones: dict[int, PhoneRef] = {}

    @property
    def deadline(self) -> float:
        return self._tracker.deadline

    def failed(self, event: DecryptError, deferred: Deferred | None = None) -> Outcome | None:
        """A message failure with its id (app-state failures and failures without an id are not messages: None).
        `deferred`: the loss-aware policy's Bad MAC, counted when the message is lost."""
        if event.message_id is None or event.source == "app-state":
            return None
        phone = phone_ref(event.organization_id, event.organization_phone_id, event.phone_jid)
        outcome = self._tracker.failed(phone.organization_phone_id, event.message_id, self._parts.now(), deferred)
        if outcome is Outcome.REPEATED:
            return outcome
        self._phones[phone.organization_phone_id] = phone
        for observer in self._parts.observers:
            observer.message_undecryptable(phone, str(outcome))
        return outcome

    def recovered(self, event: MessageRecovered) -> bool:
        phone = phone_ref(event.organization_id, event.organization_phone_id, event.phone_jid)
        known = self._tracker.recovered(phone.organization_phone_id, event.message_id)
        for observer in self._parts.observers:
            observer.message_recovered(phone, event.via, known)
        return known

    def phone(self, organization_phone_id: int) -> PhoneRef:
        return self._phones.get(organization_phone_id) or PhoneRef(0, organization_phone_id)

    async def expire(self) -> list[Lost]:
        """Count the failures whose deadline passed as lost; a session's first loss notifies its team."""
        lost = self._tracker.expired(self._parts.now())
        by_phone: dict[int, int] = {}
        for item in lost:
            by_phone[item.organization_phone_id] = by_phone.get(item.organization_phone_id, 0) + 1
        for phone_id, count in by_phone.items():
            phone = self._phones.get(phone_id) or PhoneRef(0, phone_id)
            for observer in self._parts.observers:
                observer.messages_lost(phone, count)
            if self._tracker.lost(phone_id) == count:  # its first losses
                detail = {"messagesLost": count, "lossDeadlineSeconds": self._tracker.deadline}
                stats = dict(self._parts.stats_of(phone))
                await self._parts.notices.record(
                    phone, LOSING_MESSAGES, detail, NotificationEvent.LOSING_MESSAGES, stats
                )
        return lost

    def lost(self, organization_phone_id: int) -> int:
        return self._tracker.lost(organization_phone_id)

    def losing(self) -> list[tuple[PhoneRef, int]]:
        """Sessions that lost messages, with their counts (the per-session family)."""
        return [
            (self._phones.get(phone) or PhoneRef(0, phone), count)
            for phone, count in sorted(self._tracker.losing().items())
        ]

    def forget(self, organization_phone_id: int) -> None:
        self._tracker.forget(organization_phone_id)
        self._phones.pop(organization_phone_id, None)
