"""Supervised background tasks: none of them dies silently.

A task that raises an unexpected exception is logged with its traceback, counted
(`whatsapp_sidecar_task_failures_total{task}`) and restarted with backoff. While it is down (from the failure
until its restarted run has lasted `STABLE_SECONDS`), `/readyz` answers 503 naming it. A task that returns
normally is done and not restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container

log = logging.getLogger("sidecar.supervisor")

RESTART_INITIAL_SECONDS = 0.2
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 2.0


class Supervisor:
    def __init__(self, on_failure: Callable[[str], None] | None = None) -> None:
        self._on_failure = on_failure
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: dict[str, str] = {}
        self._generation: dict[str, int] = {}

    @property
    def down(self) -> dict[str, str]:
        """Tasks that failed and have not yet run stably again: name -> the error."""
        return dict(self._down)

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `run()` under supervision; cancelling the returned task stops it for good."""
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"task {name!r} is already supervised")
        task = asyncio.create_task(self._supervise(name, run), name=name)
        self._tasks[name] = task
        return task

    async def stop(self, keep: Container[str] = ()) -> None:
        """Cancel every supervised task except those named in `keep` (their owners stop them in order)."""
        tasks = [task for name, task in self._tasks.items() if name not in keep]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        delay = RESTART_INITIAL_SECONDS
        loop = asyncio.get_running_loop()
        while True:
            generation = self._generation.get(name, 0) + 1
            self._generation[name] = generation
            if name in self._down:
                loop.call_later(STABLE_SECONDS, self._mark_stable, name, generation)
            started = loop.time()
            try:
                await run()
                self._down.pop(name, None)
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._down[name] = f"{type(error).__name__}: {error}"
                log.error("background task %s failed; restarting in %.1f s", name, delay, exc_info=True)
                if self._on_failure is not None:
                    self._on_failure(name)
                if loop.time() - started > STABLE_SECONDS:
                    delay = RESTART_INITIAL_SECONDS  # it had been running fine: a fresh failure, not a crash loop
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_SECONDS)

    def _mark_stable(self, name: str, generation: int) -> None:
        if self._generation.get(name) == generation and not self._tasks[name].done():
            self._down.pop(name, None)
