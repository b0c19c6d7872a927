"""The decider's queue in fleet mode: events in the order they were accepted, decided by one worker in batches
(many submissions merged into one transaction: group commit), bounded (past the limit, callers wait), journaled
to disk before they are accepted (with `--state-dir`), and failing closed: while PostgreSQL is away nothing is
decided, the events wait, and they are decided with their original times once it is back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from sidecar.ports import StoreSlow, StoreUnavailable, TransientConflict
from sidecar.runtime.waiting import EventJournal, Result, Submission, Waiting

log = logging.getLogger("sidecar.fleet")

RETRY_INITIAL_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
BATCH_SIZE = 500  # decisions per transaction
SLOW_ATTEMPTS = 3  # tries of one event whose statement times out, before it is dropped

Decide = Callable[[list[tuple[Waiting, int]], tuple[str, int] | None], Awaitable[list[Result]]]


class DecisionQueue:
    def __init__(
        self,
        decide: Decide,
        limit: int,
        journal: EventJournal | None = None,
        on_dropped: Callable[[str], None] | None = None,
        on_decided: Callable[[], None] | None = None,
    ) -> None:
        self._decide = decide  # one batch in one transaction: (events with journal positions, journal mark)
        # event, waiter, journal position, when it was accepted (monotonic)
        self._waiting: deque[tuple[Waiting, Submission, int, float]] = deque()
        self._journal = journal
        self._position = 0
        self._room = asyncio.Semaphore(limit)
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.unavailable_reason: str | None = None
        self.on_dropped = on_dropped  # an event dropped: "timeout" or "other"
        self._single = 0  # after a timed-out batch: how many events to decide one at a time
        self._slow_attempts = 0
        self.on_decided = on_decided  # after every committed batch (wakes webhook delivery)

    @property
    def backlog(self) -> int:
        """Events accepted and not decided yet (all of them wait while PostgreSQL is away)."""
        return len(self._waiting)

    @property
    def oldest_age(self) -> float:
        """Seconds the oldest undecided event has waited (0 with none)."""
        return time.monotonic() - self._waiting[0][3] if self._waiting else 0.0

    async def submit(self, items: list[Waiting]) -> list[Result]:
        """Queue events for the one decider of this replica (decided in the order they were submitted, many
        submissions merged into one transaction); waits for their results unless the database is away."""
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
            self._waiting.append((item, submission, position, time.monotonic()))
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
            self._waiting.append((item, nobody, position, time.monotonic()))
        if entries:
            self._start_worker()
        return len(entries)

    async def _decide_waiting(self) -> None:
        delay = RETRY_INITIAL_SECONDS
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            size = 1 if self._single else BATCH_SIZE
            chunk = [self._waiting[index] for index in range(min(size, len(self._waiting)))]
            mark = (self._journal.instance_id, chunk[-1][2]) if self._journal is not None else None
            try:
                results = await self._decide([(item, position) for item, _, position, _ in chunk], mark)
            except StoreSlow as error:
                # Not an outage: a batch is retried one event at a time, an event that times out on each of
                # SLOW_ATTEMPTS tries is dropped (logged), so a slow statement cannot hold the decider forever.
                if len(chunk) > 1:
                    log.warning("a decision batch of %d timed out; deciding one at a time: %s", len(chunk), error)
                    self._single = len(chunk)
                    continue
                self._slow_attempts += 1
                if self._slow_attempts < SLOW_ATTEMPTS:
                    continue
                self._slow_attempts = 0
                self._single = max(0, self._single - 1)
                self._drop_first(f"timed out {SLOW_ATTEMPTS} times: {error}", "timeout")
                continue
            except TransientConflict as error:
                log.info("decision batch aborted by PostgreSQL (%s); retrying", error)
                await asyncio.sleep(RETRY_INITIAL_SECONDS / 10)
                continue
            except StoreUnavailable as error:
                self.unavailable(error)
                for _, submission, _, _ in self._waiting:  # nobody waits on a database that is away
                    submission.give_up()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            except Exception as error:
                # A bug, not an outage: the decider must go on. The first event of the batch is dropped (it is
                # the likeliest culprit, and the error says which), the rest are tried again.
                log.error("deciding a batch failed unexpectedly", exc_info=error)
                self._drop_first(f"{type(error).__name__}: {error}", "other")
                continue
            self._slow_attempts = 0
            self._single = max(0, self._single - len(chunk))
            for (_, submission, _, _), result in zip(chunk, results, strict=True):
                self._waiting.popleft()
                self._room.release()
                submission.add(result)
            if self._journal is not None:
                self._journal.mark_applied(chunk[-1][2], nothing_pending=not self._waiting)
            if self.on_decided is not None:
                self.on_decided()
            if self.unavailable_reason is not None:
                log.info("PostgreSQL is back; the waiting events were decided")
                self.unavailable_reason = None
            delay = RETRY_INITIAL_SECONDS

    def _drop_first(self, why: str, reason: str) -> None:
        item, submission, position, _ = self._waiting.popleft()
        self._room.release()
        submission.give_up()
        if self._journal is not None:
            self._journal.mark_applied(position, nothing_pending=not self._waiting)
        log.error(
            "an event could not be decided and was dropped: %s of organizationPhoneId %d (%s)",
            type(item.event).__name__,
            item.phone.organization_phone_id,
            why,
        )
        if self.on_dropped is not None:
            self.on_dropped(reason)

    def reachable(self) -> None:
        """PostgreSQL answered someone else (the settings watch). With nothing waiting, no decision will come to say
        so: the replica is no longer unavailable (it would stay not ready after an outage otherwise, while idle)."""
        if self.unavailable_reason is not None and not self._waiting:
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
        if self._waiting:
            log.warning("stopping with %d events not decided (PostgreSQL unreachable)", len(self._waiting))
