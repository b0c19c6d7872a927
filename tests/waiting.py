"""Wait for a condition by polling with a deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    deadline_seconds: float = 30.0,
    interval: float = 0.05,
    what: str = "",
) -> None:
    deadline = time.monotonic() + deadline_seconds
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {deadline_seconds}s: {what or condition}")
        await asyncio.sleep(interval)
