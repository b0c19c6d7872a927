"""The decider's queue in fleet mode: events in the order they were accepted, decided by one worker in batches
(many submissions merged into one transaction: group commit), bounded (past the limit, callers wait), journaled
to disk before they are accepted (with `--state-dir`), and failing closed: while PostgreSQL is away nothing is
decided, the events wait, and they are decided with their original times once it is back.

A phone whose row (or the breaker's lock) another PostgreSQL session holds is parked: its events, in their order,
wait aside and are retried with a growing delay, while every other phone's events go on being decided. An accepted
event is never dropped for having waited; past STALL_SECONDS `/readyz` says which wait and for how long."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sidecar.ports import JournalProgress, StoreSlow, StoreUnavailable, TransientConflict
from sidecar.runtime.waiting import EventJournal, Result, Submission, Waiting

log = logging.getLogger("sidecar.fleet")

RETRY_INITIAL_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
BATCH_SIZE = 500  # decisions per transaction
PARKED_RETRY_INITIAL_SECONDS = 0.02  # a row locked by another replica's batch is free again within milliseconds
PARKED_RETRY_MAX_SECONDS = 1.0
WAITERS_SECONDS = 2.0  # who sent a parked phone's event waits this long for its decision, then is answered
STALL_SECONDS = 30.0  # a phone parked this long: /readyz is not ready (a session holding locks that long is stuck)

# One batch in one transaction: (events with journal positions, the journal's progress) -> a result per event,
# None for an event not decided because its phone's row or the breaker's lock was held elsewhere.
Decide = Callable[[list[tuple[Waiting, int]], JournalProgress | None], Awaitable[list[Result | None]]]


@dataclass(slots=True)
class _Entry:
    item: Waiting
    submission: Submission
    position: int  # in the undecided-events journal (a counter without one)
    accepted: float  # monotonic


@dataclass(slots=True)
class _Parked:
    """A phone's events waiting aside, in their order, until its row can be locked."""

    entries: deque[_Entry]
    since: float  # monotonic: when the phone was parked
    retry_at: float
    delay: float
    why: str
    released: bool = False  # its senders no longer wait (past WAITERS_SECONDS)


class DecisionQueue:
    def __init__(
        self,
        decide: Decide,
        limit: int,
        journal: EventJournal | None = None,
        on_dropped: Callable[[str], None] | None = None,
        on_decided: Callable[[], None] | None = None,
    ) -> None:
        self._decide = decide
        self._waiting: deque[_Entry] = deque()  # in the order accepted (= journal order); no parked phone's
        self._parked: dict[int, _Parked] = {}  # by organizationPhoneId
        self._undecided = 0  # waiting + parked
        self._journal = journal
        self._position = 0
        self._high = 0  # the highest position decided
        self._room = asyncio.Semaphore(limit)
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.unavailable_reason: str | None = None
        self.on_dropped = on_dropped  # an event dropped by a bug in deciding it: "other"
        self._single = 0  # after a timed-out batch: how many events to decide one at a time
        self.on_decided = on_decided  # after every committed batch (wakes webhook delivery)
        self._advanced = asyncio.Event()  # set (and replaced) after every committed batch

    @property
    def backlog(self) -> int:
        """Events accepted and not decided yet (all of them wait while PostgreSQL is away)."""
        return self._undecided

    @property
    def oldest_age(self) -> float:
        """Seconds the oldest undecided event has waited (0 with none)."""
        oldest = [entry.accepted for entry in itertools.islice(self._waiting, 1)]
        oldest += [parked.entries[0].accepted for parked in self._parked.values()]
        return time.monotonic() - min(oldest) if oldest else 0.0

    @property
    def parked_phones(self) -> int:
        """Phones whose events wait on a row or lock held by another PostgreSQL session."""
        return len(self._parked)

    @property
    def stalled_reason(self) -> str | None:
        """Why decisions are stalled (a phone parked past STALL_SECONDS), for /readyz; None when they are not."""
        if not self._parked:
            return None
        now = time.monotonic()
        stuck = [parked for parked in self._parked.values() if now - parked.since > STALL_SECONDS]
        if not stuck:
            return None
        events = sum(len(parked.entries) for parked in stuck)
        oldest = max(stuck, key=lambda parked: now - parked.since)
        return (
            f"decisions stalled: {events} events of {len(stuck)} phones wait on rows or locks another PostgreSQL "
            f"session holds; the oldest undecided event waited {self.oldest_age:.0f} s ({oldest.why})"
        )

    @property
    def accepted_mark(self) -> int:
        """The position of the last event accepted: `until_durable(mark)` waits for it (runtime link acks)."""
        return self._journal.last_position if self._journal is not None else self._position

    def is_durable(self, mark: int) -> bool:
        """Every event accepted up to `mark` survives this process: journaled to disk, or decided."""
        return self._journal is not None or self._low_water() >= mark

    async def until_durable(self, mark: int) -> None:
        while not self.is_durable(mark):
            await self._advanced.wait()

    async def submit(self, items: list[Waiting]) -> list[Result]:
        """Queue events for the one decider of this replica (decided in the order they were submitted, many
        submissions merged into one transaction); waits for their results unless the database is away or
        a phone's row is locked elsewhere (those events are decided later)."""
        if not items:
            return []
        submission = Submission(len(items), asyncio.get_running_loop().create_future())
        for item in items:
            await self._room.acquire()  # bounded: past the limit the caller (the runtime link) slows down
            try:
                position = self._journaled(item)
            except BaseException:
                self._room.release()  # not accepted: the permit goes back
                raise
            self._waiting.append(_Entry(item, submission, position, time.monotonic()))
            self._undecided += 1
        self._start_worker()
        if self.unavailable_reason is not None:
            return []  # kept in order; decided once PostgreSQL is back
        return await asyncio.shield(submission.future)

    def _journaled(self, item: Waiting) -> int:
        if self._journal is not None:
            return self._journal.append(item)  # on disk before the event is accepted
        self._position += 1
        return self._position

    def _start_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._decide_waiting(), name="fleet-decider")
        self._wake.set()

    async def replay(self) -> int:
        """Queue the events a previous run accepted and never decided (before anything new is accepted)."""
        if self._journal is None:
            return 0
        entries = self._journal.load()
        nobody = Submission(len(entries), asyncio.get_running_loop().create_future())
        for position, item in entries:
            await self._room.acquire()
            self._waiting.append(_Entry(item, nobody, position, time.monotonic()))
            self._undecided += 1
        if entries:
            self._start_worker()
        return len(entries)

    def _next_chunk(self) -> list[_Entry]:
        """Parked phones due for a retry first, then the waiting events in order; a parked phone's later
        events join it (a phone's events are always decided in their order)."""
        size = 1 if self._single else BATCH_SIZE
        chunk: list[_Entry] = []
        now = time.monotonic()
        for parked in self._parked.values():
            if not parked.released and now - parked.since > WAITERS_SECONDS:
                parked.released = True  # the link reads on, and the sender is told the session continues
                for entry in parked.entries:
                    entry.submission.give_up()
            if parked.retry_at <= now and len(chunk) < size:
                chunk.extend(itertools.islice(parked.entries, size - len(chunk)))
        index = 0
        while len(chunk) < size and index < len(self._waiting):
            entry = self._waiting[index]
            parked_phone = self._parked.get(entry.item.phone.organization_phone_id)
            if parked_phone is not None:
                del self._waiting[index]
                parked_phone.entries.append(entry)
                if parked_phone.released:
                    entry.submission.give_up()
                continue
            chunk.append(entry)
            index += 1
        return chunk

    def _undecided_below(self, high: int, decided: frozenset[int]) -> list[int]:
        """Journal positions below `high` not decided (by this batch or before): what a replay must not skip."""
        below = list(itertools.takewhile(lambda position: position < high, (e.position for e in self._waiting)))
        below += [entry.position for parked in self._parked.values() for entry in parked.entries]
        return sorted(position for position in below if position < high and position not in decided)

    async def _idle(self) -> None:
        """Until something is submitted or a parked phone is due for its retry."""
        self._wake.clear()
        due = min(
            (p.retry_at if p.released else min(p.retry_at, p.since + WAITERS_SECONDS) for p in self._parked.values()),
            default=None,
        )
        timeout = None if due is None else max(0.0, due - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _decide_waiting(self) -> None:
        delay = RETRY_INITIAL_SECONDS
        while True:
            chunk = self._next_chunk()
            if not chunk:
                await self._idle()
                continue
            progress = JournalProgress(self._journal.instance_id, self._undecided_below) if self._journal else None
            try:
                results = await self._decide([(entry.item, entry.position) for entry in chunk], progress)
            except StoreSlow as error:
                # Not an outage: a batch that timed out is retried one event at a time; one event that times
                # out is parked and retried later (never dropped), so the others go on being decided.
                if len(chunk) > 1:
                    log.warning("a decision batch of %d timed out; deciding one at a time: %s", len(chunk), error)
                    self._single = len(chunk)
                    continue
                self._single = max(0, self._single - 1)
                self._park(chunk[0], f"statement timed out: {error}")
                continue
            except TransientConflict as error:
                log.info("decision batch aborted by PostgreSQL (%s); retrying", error)
                await asyncio.sleep(RETRY_INITIAL_SECONDS / 10)
                continue
            except StoreUnavailable as error:
                self.unavailable(error)
                for entry in self._all():  # nobody waits on a database that is away
                    entry.submission.give_up()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            except Exception as error:
                # A bug, not an outage: the decider must go on. The first event of the batch is dropped (it is
                # the likeliest culprit, and the error says which), the rest are tried again.
                log.error("deciding a batch failed unexpectedly", exc_info=error)
                self._drop(chunk[0], f"{type(error).__name__}: {error}")
                continue
            self._single = max(0, self._single - len(chunk))
            for entry, result in zip(chunk, results, strict=True):
                if result is None:
                    self._park(entry, "its row or the breaker's lock is held by another PostgreSQL session")
                else:
                    self._remove(entry)
                    self._high = max(self._high, entry.position)
                    entry.submission.add(result)
            if self._journal is not None:
                self._journal.mark_applied(self._low_water(), nothing_pending=not self._undecided)
            self._advanced.set()
            self._advanced = asyncio.Event()
            if self.on_decided is not None:
                self.on_decided()
            if self.unavailable_reason is not None:
                log.info("PostgreSQL is back; the waiting events were decided")
                self.unavailable_reason = None
            delay = RETRY_INITIAL_SECONDS

    def _all(self) -> list[_Entry]:
        return [*self._waiting, *(entry for parked in self._parked.values() for entry in parked.entries)]

    def _low_water(self) -> int:
        """Every journal position up to this one is decided (what the file may forget on a restart)."""
        firsts = [entry.position for entry in itertools.islice(self._waiting, 1)]
        firsts += [parked.entries[0].position for parked in self._parked.values()]
        return min(firsts) - 1 if firsts else self._high

    def _remove(self, entry: _Entry) -> None:
        """Take a decided (or dropped) event out of the queue: the head of the waiting events or of its phone's."""
        phone_id = entry.item.phone.organization_phone_id
        parked = self._parked.get(phone_id)
        if parked is not None and parked.entries and parked.entries[0] is entry:
            parked.entries.popleft()
            if not parked.entries:
                del self._parked[phone_id]
                log.info("organizationPhoneId %d: its row is free again; its events are decided", phone_id)
        else:
            assert self._waiting[0] is entry, "a batch is a prefix of the waiting events"
            self._waiting.popleft()
        self._undecided -= 1
        self._room.release()

    def _park(self, entry: _Entry, why: str) -> None:
        phone_id = entry.item.phone.organization_phone_id
        now = time.monotonic()
        parked = self._parked.get(phone_id)
        if parked is None:
            retry_at = now + PARKED_RETRY_INITIAL_SECONDS
            parked = self._parked[phone_id] = _Parked(deque(), now, retry_at, PARKED_RETRY_INITIAL_SECONDS, why)
            log.info("organizationPhoneId %d waits: %s; the other phones go on", phone_id, why)
        if self._waiting and self._waiting[0] is entry:  # first met in the waiting events: it joins its phone's
            self._waiting.popleft()
            parked.entries.append(entry)
        elif parked.entries[0] is entry:  # a retry that found the row held again
            parked.delay = min(parked.delay * 2, PARKED_RETRY_MAX_SECONDS)
            parked.retry_at = now + parked.delay
        parked.why = why
        if parked.released:
            entry.submission.give_up()  # whoever sent it does not wait any longer: it is decided later

    def _drop(self, entry: _Entry, why: str) -> None:
        self._remove(entry)
        entry.submission.give_up()
        if self._journal is not None:
            self._journal.mark_applied(self._low_water(), nothing_pending=not self._undecided)
        log.error(
            "an event could not be decided and was dropped: %s of organizationPhoneId %d (%s)",
            type(entry.item.event).__name__,
            entry.item.phone.organization_phone_id,
            why,
        )
        if self.on_dropped is not None:
            self.on_dropped("other")

    def reachable(self) -> None:
        """PostgreSQL answered someone else (the settings watch). With nothing waiting, no decision will come to say
        so: the replica is no longer unavailable (it would stay not ready after an outage otherwise, while idle)."""
        if self.unavailable_reason is not None and not self._undecided:
            log.info("PostgreSQL is back")
            self.unavailable_reason = None

    def unavailable(self, error: StoreUnavailable) -> None:
        if self.unavailable_reason is None:
            log.warning("PostgreSQL unreachable: decisions wait until it is back (%s)", error)
        self.unavailable_reason = str(error)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._undecided:
            log.warning("stopping with %d events not decided", self._undecided)
