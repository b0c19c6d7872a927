"""The ordered, bounded queue of database steps, and the one worker that applies them.

Steps are applied in the order they were accepted, in batches. While the store is unreachable they wait here
(up to a limit; past it `submit` waits for room, which slows the callers down instead of growing memory) and
the worker retries with backoff. A step that fails by itself is reported to whoever waits for it, logged with
its payload, counted (`on_failed`), and the queue moves on. A batch whose statement times out is retried one
step at a time; a single step that times out `SLOW_ATTEMPTS` times is failed the same way, so no step is
retried forever. The worker runs under the supervisor (sidecar.supervisor): an unexpected error restarts it
with the queue intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sidecar.ports import SessionStore, StepFailed, StoreSlow, StoreUnavailable, TransientConflict
from sidecar.rules.records import Step, StepResult, step_to_json, without_numbers
from sidecar.store.db_errors import failure_reason
from sidecar.store.journal import Journal
from sidecar.supervisor import Supervisor

log = logging.getLogger("sidecar.store.pending")

BATCH_SIZE = 2048
RETRY_INITIAL_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
SLOW_ATTEMPTS = 3
# Admission: new events wait while the oldest accepted step is older than this (and the store is reachable),
# so what was accepted is durable within about this long even when events arrive faster than PostgreSQL
# takes them. During an outage the queue's limit (and the journal) govern instead.
LAG_TARGET_SECONDS = 0.5


@dataclass(slots=True)
class _Pending:
    position: int
    step: Step
    future: asyncio.Future[StepResult]
    accepted_at: float = field(default_factory=time.monotonic)


def _new_future() -> asyncio.Future[StepResult]:
    future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
    # Replayed and fire-and-forget steps have no waiter; reading the exception keeps asyncio quiet about it.
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


class PendingSteps:
    def __init__(
        self,
        store: SessionStore,
        limit: int,
        journal: Journal[Step] | None = None,
        on_wait: Callable[[float], None] | None = None,
        on_failed: Callable[[Step, str], None] | None = None,
        supervisor: Supervisor | None = None,
        on_applied: Callable[[], None] | None = None,
    ) -> None:
        """`on_failed(step, reason)`: a step was dropped (reason: timeout, integrity, data, other)."""
        self._store = store
        self._limit = limit
        self._on_wait = on_wait
        self._on_failed = on_failed
        self._supervisor = supervisor or Supervisor()
        self._caught_up = asyncio.Event()
        self._caught_up.set()
        self._single_steps = 0  # after a timed-out batch: how many steps to apply one at a time
        self._slow_attempts = 0
        self._journal = journal
        self._queue: deque[_Pending] = deque()
        self._room = asyncio.Semaphore(limit)
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self._position = 0
        self.unavailable_reason: str | None = None
        self.failed_steps = 0
        self.on_applied = on_applied  # after every batch that reached the store (wakes webhook delivery)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def oldest_age(self) -> float:
        """Seconds the oldest pending step has waited (0 when none): the accepted-to-durable lag."""
        return time.monotonic() - self._queue[0].accepted_at if self._queue else 0.0

    @property
    def room(self) -> int:
        """How many more steps would be accepted without waiting."""
        return max(0, self._limit - len(self._queue))

    async def start(self) -> int:
        """Start the worker, first queueing what the journal kept from a previous run. Returns that count."""
        replayed = 0
        if self._journal is not None:
            for position, step in self._journal.load():
                await self._room.acquire()
                self._queue.append(_Pending(position, step, _new_future()))
                replayed += 1
            if replayed:
                self._idle.clear()
                self._work.set()
        self._worker = self._supervisor.start("pending-steps", self._run)
        return replayed

    async def submit(self, step: Step) -> asyncio.Future[StepResult]:
        await self._room.acquire()
        if self._journal is not None:
            try:
                position = self._journal.append(step)
            except BaseException:
                self._room.release()  # not accepted: the permit goes back
                raise
        else:
            self._position += 1
            position = self._position
        pending = _Pending(position, step, _new_future())
        self._queue.append(pending)
        self._idle.clear()
        self._work.set()
        return pending.future

    async def caught_up(self) -> None:
        """Admission for new events: returns once the writer is within LAG_TARGET_SECONDS of what was accepted
        (at once while the store is unreachable: then the queue's limit applies)."""
        while self.unavailable_reason is None and self.oldest_age > LAG_TARGET_SECONDS:
            self._caught_up.clear()
            await self._caught_up.wait()

    async def drained(self) -> None:
        """Wait until every accepted step was applied or failed."""
        await self._idle.wait()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Give the worker a moment to flush; what is left stays in the journal for the next start."""
        if self._worker is None:
            return
        try:
            # No point waiting for a store that is away: the journal (if any) keeps the steps.
            await asyncio.wait_for(asyncio.shield(self._idle.wait()), 0 if self.unavailable_reason else flush_timeout)
        except TimeoutError:
            log.warning("stopping with %d database steps pending", len(self._queue))
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None
        for pending in self._queue:
            pending.future.cancel()
        if self._journal is not None:
            self._journal.close()

    async def _run(self) -> None:
        delay = RETRY_INITIAL_SECONDS
        while True:
            self._caught_up.set()  # waiters re-check after every round (a batch applied, an outage noticed)
            if not self._queue:
                self._idle.set()
                self._work.clear()
                await self._work.wait()
                continue
            size = 1 if self._single_steps else BATCH_SIZE
            batch = [self._queue[i] for i in range(min(size, len(self._queue)))]
            try:
                results = await self._apply(batch)
            except StoreSlow as error:
                self._slow(batch, error)
                continue
            except TransientConflict as error:  # a deadlock or serialization abort: nothing kept, retry now
                log.info("database batch aborted by PostgreSQL (%s); retrying", error)
                await asyncio.sleep(RETRY_INITIAL_SECONDS / 10)
                continue
            except StoreUnavailable as error:
                if self.unavailable_reason is None:
                    log.warning("database unavailable; %d steps wait: %s", len(self._queue), error)
                self.unavailable_reason = str(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            if self.unavailable_reason is not None:
                log.info("database is back; applying %d pending steps", len(self._queue))
            self.unavailable_reason = None
            delay = RETRY_INITIAL_SECONDS
            self._slow_attempts = 0
            self._single_steps = max(0, self._single_steps - len(batch))
            self._finish(batch[: len(results)], results)

    def _slow(self, batch: Sequence[_Pending], error: StoreSlow) -> None:
        """A timed-out batch is retried one step at a time; a step that keeps timing out is failed."""
        if len(batch) > 1:
            log.warning("a batch of %d database steps timed out; applying them one at a time: %s", len(batch), error)
            self._single_steps = len(batch)
            return
        self._slow_attempts += 1
        if self._slow_attempts < SLOW_ATTEMPTS:
            return
        self._slow_attempts = 0
        self._single_steps = max(0, self._single_steps - 1)
        self._fail(batch[0], error)

    async def _apply(self, batch: Sequence[_Pending]) -> list[StepResult]:
        """Apply a batch; on a step that fails by itself, apply what came before it and drop that one."""
        try:
            return await self._store.apply([p.step for p in batch], self._journal_mark(batch))
        except StepFailed as failure:
            good = batch[: failure.index]
            results = await self._store.apply([p.step for p in good], self._journal_mark(good)) if good else []
            self._finish(good, results)
            self._fail(batch[failure.index], failure.error)
            return []

    def _fail(self, bad: _Pending, error: BaseException) -> None:
        """Drop the step at the head of the queue: logged with its payload, counted, its waiter told."""
        assert self._queue and self._queue[0] is bad
        reason = failure_reason(error)
        self.failed_steps += 1
        log.error(
            "database step failed and was dropped (%s): %s: %s; step: %s",
            reason,
            type(error).__name__,
            without_numbers(str(error)),
            without_numbers(step_to_json(bad.step)),
        )
        if self._on_failed is not None:
            self._on_failed(bad.step, reason)
        self._queue.popleft()
        self._room.release()
        if self._journal is not None:
            self._journal.mark_applied(bad.position, nothing_pending=not self._queue)
        bad.future.set_exception(error)

    def _journal_mark(self, batch: Sequence[_Pending]) -> tuple[str, list[int]] | None:
        if self._journal is None or not batch:
            return None
        return self._journal.instance_id, [p.position for p in batch]

    def _finish(self, batch: Sequence[_Pending], results: Sequence[StepResult]) -> None:
        now = time.monotonic()
        for pending, result in zip(batch, results, strict=True):
            if self._on_wait is not None:
                self._on_wait(now - pending.accepted_at)
            self._queue.popleft()
            self._room.release()
            if not pending.future.done():
                pending.future.set_result(result)
        if batch and self._journal is not None:
            self._journal.mark_applied(batch[-1].position, nothing_pending=not self._queue)
        if batch and self.on_applied is not None:
            self.on_applied()
