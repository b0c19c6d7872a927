"""Message loss (rules/loss.py): failures with a `messageId` are pending until a `message.recovered` names them
or `--loss-deadline` passes; the observers count undecryptable, recovered and lost messages, and a session's
first loss is told to its team (`session.losing_messages`).

With the PostgreSQL store the failures are also kept in the loss ledger (store/loss_ledger.py), exchanged once a
tick: a phone's events reach the replica its runtime connection is on, but after a link reconnect to another
replica the recovery may arrive there; the ledger makes it count, settles each failure exactly once in the fleet,
and takes over the failures of a replica that went away. While the ledger cannot be reached nothing is counted
lost (the due failures wait for it).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Final

from sidecar.events.schema import DecryptError, MessageRecovered
from sidecar.ports import LossLedger, SharedFailure, StoreUnavailable
from sidecar.retrying import RetryLog
from sidecar.rules.inputs import phone_ref
from sidecar.rules.loss import Deferred, LossTracker, Lost, Outcome
from sidecar.rules.records import NotificationEvent, PhoneRef
from sidecar.runtime.parts import RuntimeParts

LOSING_MESSAGES = "session.losing_messages"  # the decision record and the owner webhook of a session's first loss
# What waits for the ledger while it is away (failures to share, recoveries, due failures), each at most this many;
# past it a recovery is known here only, and the oldest due failures are neither lost nor recovered (logged).
LEDGER_BACKLOG: Final = 100_000

log = logging.getLogger("sidecar.loss")


class MessageLoss:
    def __init__(
        self, parts: RuntimeParts, tracker: LossTracker | None = None, ledger: LossLedger | None = None
    ) -> None:
        self._parts = parts
        self._tracker = tracker or LossTracker()
        self._ledger = ledger
        self._phones: dict[int, PhoneRef] = {}
        self._unshared: dict[tuple[int, str], SharedFailure] = {}
        self._recoveries: dict[tuple[int, str], PhoneRef] = {}
        self._unsettled: list[Lost] = []
        self._retries = RetryLog(log, "settle failed messages with the fleet", meanwhile="none counted lost")

    @property
    def deadline(self) -> float:
        return self._tracker.deadline

    def failed(self, event: DecryptError, deferred: Deferred | None = None) -> Outcome | None:
        """A message failure with its id (app-state failures and failures without an id are not messages: None),
        its observers told. `deferred`: the loss-aware policy's Bad MAC, counted when the message is lost."""
        if event.message_id is None or event.source == "app-state":
            return None
        pid = event.organization_phone_id
        outcome = self._tracker.failed(pid, event.message_id, self._parts.now(), deferred)
        if outcome is Outcome.REPEATED:
            return outcome
        phone = self._named(event.organization_id, pid, event.phone_jid)
        if outcome is Outcome.PENDING:
            self._share(phone, event.message_id, deferred)
        for observer in self._parts.observers:
            observer.message_undecryptable(phone, str(outcome))
        return outcome

    def track_batch(
        self, failures: list[tuple[int, str]], phones: dict[int, tuple[int, str]], now: float
    ) -> Counter[tuple[int, str]]:
        """One batch's failed messages (the error tally's: no deferred Bad MAC), observers not told: `failures`
        (session, id) in order, `phones` each session's (organization, JID). Returns the counts per
        (organization, outcome) of the messages not seen before."""
        outcomes, fresh = self._tracker.failed_batch(failures, now)
        for organization_phone_id in fresh:  # the others were named when their first failure came
            organization_id, phone_jid = phones[organization_phone_id]
            self._named(organization_id, organization_phone_id, phone_jid)
        if self._ledger is not None:
            for (organization_phone_id, message_id), outcome in zip(failures, outcomes, strict=True):
                if outcome is Outcome.PENDING:
                    self._share(PhoneRef(phones[organization_phone_id][0], organization_phone_id), message_id, None)
        organizations = [phones[organization_phone_id][0] for organization_phone_id, _ in failures]
        counts: Counter[tuple[int, str]] = Counter(zip(organizations, outcomes, strict=True))
        for key in [key for key in counts if key[1] is Outcome.REPEATED]:
            del counts[key]  # the same message again: counted once
        return counts

    def _named(self, organization_id: int, organization_phone_id: int, phone_jid: str) -> PhoneRef:
        """The session's phone, kept for its loss notices (named anew when the event names another organization)."""
        phone = self._phones.get(organization_phone_id)
        if phone is None or phone.organization_id != organization_id:
            phone = self._phones[organization_phone_id] = phone_ref(organization_id, organization_phone_id, phone_jid)
        return phone

    def _share(self, phone: PhoneRef, message_id: str, deferred: Deferred | None) -> None:
        """A pending failure the ledger shares on the next tick (with the PostgreSQL store only)."""
        if self._ledger is not None and len(self._unshared) < LEDGER_BACKLOG:
            peer = deferred.peer_user if deferred is not None else None
            shared = SharedFailure(phone, message_id, deferred is not None, peer)
            self._unshared[phone.organization_phone_id, message_id] = shared

    def recovered(self, event: MessageRecovered) -> bool:
        phone = phone_ref(event.organization_id, event.organization_phone_id, event.phone_jid)
        known = self._tracker.recovered(phone.organization_phone_id, event.message_id)
        if self._ledger is not None:
            key = (phone.organization_phone_id, event.message_id)
            if self._unshared.pop(key, None) is None and len(self._recoveries) < LEDGER_BACKLOG:
                self._recoveries[key] = phone  # shared already, or failed on another replica: the ledger marks it
        for observer in self._parts.observers:
            observer.message_recovered(phone, event.via, known)
        return known

    def phone(self, organization_phone_id: int) -> PhoneRef:
        return self._phones.get(organization_phone_id) or PhoneRef(0, organization_phone_id)

    async def expire(self) -> list[Lost]:
        """Count the failures whose deadline passed as lost; a session's first loss notifies its team."""
        now = self._parts.now()
        lost = self._tracker.expired(now) if self._ledger is None else await self._exchange(self._ledger, now)
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

    async def _exchange(self, ledger: LossLedger, now: float) -> list[Lost]:
        """One exchange with the ledger: what is lost of the due failures (exactly once in the fleet), and the
        failures of replicas that went away."""
        due = self._unsettled + self._tracker.due(now)
        if len(due) > LEDGER_BACKLOG:
            dropped = len(due) - LEDGER_BACKLOG
            log.warning("the loss ledger is away: %d due failures neither lost nor recovered", dropped)
            due = due[-LEDGER_BACKLOG:]
        failed, recovered = list(self._unshared.values()), list(self._recoveries.items())
        try:
            settled = await ledger.exchange(
                failed,
                [(phone, message_id) for (_, message_id), phone in recovered],
                [(item.organization_phone_id, item.message_id) for item in due],
                self._tracker.deadline,
            )
        except StoreUnavailable as error:
            self._retries.failed(error)
            self._unsettled = due  # nothing is lost while the replicas cannot agree: the next tick tries again
            return []
        self._retries.succeeded()
        self._unsettled = []
        for item in failed:
            self._unshared.pop((item.phone.organization_phone_id, item.message_id), None)
        for key, _ in recovered:
            self._recoveries.pop(key, None)
        lost = [item for item in due if (item.organization_phone_id, item.message_id) in settled.lost]
        for orphan in settled.orphans:
            self._phones.setdefault(orphan.phone.organization_phone_id, orphan.phone)
            deferred = Deferred(orphan.peer_user) if orphan.deferred else None
            lost.append(Lost(orphan.phone.organization_phone_id, orphan.message_id, deferred))
        self._tracker.count_lost(lost)
        return lost

    async def hand_over(self) -> int:
        """On the way out (SIGTERM, a rolling upgrade): share what the ledger does not have yet, so the replicas
        that stay settle it (a failure whose replica went away is theirs past its deadline). Returns how many."""
        failed, recovered = list(self._unshared.values()), list(self._recoveries.items())
        if self._ledger is None or not (failed or recovered):
            return 0
        recoveries = [(phone, message_id) for (_, message_id), phone in recovered]
        await self._ledger.exchange(failed, recoveries, [], self._tracker.deadline, take_orphans=False)
        self._unshared.clear()
        self._recoveries.clear()
        return len(failed) + len(recovered)

    def lost(self, organization_phone_id: int) -> int:
        return self._tracker.lost(organization_phone_id)

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    def pending(self, organization_phone_id: int) -> int:
        """Failures still waited on: tracked, or due and waiting for the ledger."""
        waiting = sum(1 for item in self._unsettled if item.organization_phone_id == organization_phone_id)
        return self._tracker.pending(organization_phone_id) + waiting

    def losing(self) -> list[tuple[PhoneRef, int]]:
        """Sessions that lost messages, with their counts (the per-session family)."""
        return [
            (self._phones.get(phone) or PhoneRef(0, phone), count)
            for phone, count in sorted(self._tracker.losing().items())
        ]

    def forget(self, organization_phone_id: int) -> None:
        self._tracker.forget(organization_phone_id)
        self._phones.pop(organization_phone_id, None)
