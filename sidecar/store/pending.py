"""The ordered, bounded queue of database steps, and the one worker that applies them.

Steps are applied in the order they were accepted, in batches. While the store is unreachable they wait here
(up to a limit; past it `submit` waits for room, which slows the callers down instead of growing memory) and
the worker retries with backoff. A step that fails by itself is reported to whoever waits for it, logged with
its payload, and the queue moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sidecar.ports import SessionStore, StepFailed, StoreUnavailable
from sidecar.rules.records import Step, StepResult, step_to_json, without_numbers
from sidecar.store.journal import Journal

log = logging.getLogger("sidecar.store.pending")

BATCH_SIZE = 256
RETRY_INITIAL_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0


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
    ) -> None:
        self._store = store
        self._limit = limit
        self._on_wait = on_wait
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
        self.on_applied: Callable[[], None] | None = None  # after every batch that reached the store

    @property
    def depth(self) -> int:
        return len(self._queue)

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
        self._worker = asyncio.create_task(self._run(), name="pending-steps")
        return replayed

    async def submit(self, step: Step) -> asyncio.Future[StepResult]:
        await self._room.acquire()
        if self._journal is not None:
            position = self._journal.append(step)
        else:
            self._position += 1
            position = self._position
        pending = _Pending(position, step, _new_future())
        self._queue.append(pending)
        self._idle.clear()
        self._work.set()
        return pending.future

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
            if not self._queue:
                self._idle.set()
                self._work.clear()
                await self._work.wait()
                continue
            batch = [self._queue[i] for i in range(min(BATCH_SIZE, len(self._queue)))]
            try:
                results = await self._apply(batch)
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
            self._finish(batch[: len(results)], results)

    async def _apply(self, batch: Sequence[_Pending]) -> list[StepResult]:
        """Apply a batch; on a step that fails by itself, apply what came before it and drop that one."""
        try:
            return await self._store.apply([p.step for p in batch], self._journal_mark(batch))
        except StepFailed as failure:
            good = batch[: failure.index]
            results = await self._store.apply([p.step for p in good], self._journal_mark(good)) if good else []
            bad = batch[failure.index]
            self.failed_steps += 1
            log.error(
                "database step failed and was dropped: %s: %s; step: %s",
                type(failure.error).__name__,
                without_numbers(str(failure.error)),
                without_numbers(step_to_json(bad.step)),
            )
            self._finish(good, results)
            self._queue.popleft()
            self._room.release()
            if self._journal is not None:
                self._journal.mark_applied(bad.position, nothing_pending=not self._queue)
            bad.future.set_exception(failure.error)
            return []

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
