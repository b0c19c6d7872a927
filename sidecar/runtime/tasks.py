"""Background effects the runtime started (heals, closes, re-sent session ends), tracked so that shutdown and
the tests can wait for them and nothing outlives the runtime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("sidecar.runtime.tasks")


class BackgroundTasks:
    def __init__(self, on_failure: Callable[[], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_failure = on_failure

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        """An effect that raised is logged with its traceback and counted; nobody else would read it."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("a background effect failed", exc_info=task.exception())
        if self._on_failure is not None:
            self._on_failure()

    def __len__(self) -> int:
        return len(self._tasks)

    async def settle(self) -> None:
        """Wait for every background effect started so far, and for those they start."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def shutdown(self, grace_seconds: float) -> None:
        """Let running effects finish (bounded), then cancel what is left."""
        try:
            await asyncio.wait_for(self.settle(), grace_seconds)
        except TimeoutError:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
