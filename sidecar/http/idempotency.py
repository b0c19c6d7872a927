"""`POST /v1/events` with an `Idempotency-Key` header: a retried body with the same key, within
IDEMPOTENCY_WINDOW_SECONDS, is answered as the first time and applied once (a client whose post hung during a
partition can retry without counting an error twice). The same key with another body is refused (422); a retry
while the first is still being applied is told to wait (409). Only a 202 is remembered: a refused post (400, 429)
may be retried as it is. Kept in PostgreSQL with a database (shared by a fleet's replicas, kept across restarts:
store/idempotency_keys.py), in memory without one (bounded: the oldest keys go first)."""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600.0
IN_PROGRESS_SECONDS = 60.0  # a first post not finished by then (its replica died) no longer holds the key
MEMORY_KEYS = 100_000
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True, slots=True)
class Answered:
    """The first answer, to be given again."""

    status: int
    body: dict[str, Any]


class KeyInProgress(Exception):
    """The first post with this key is still being applied."""


class KeyReused(Exception):
    """The key was used for another body."""


class IdempotencyKeys(Protocol):
    async def begin(self, key: str, digest: str) -> Answered | None:
        """Claim the key for this body (None: apply it), or the first answer; raises KeyInProgress, KeyReused."""

    async def finish(self, key: str, answer: Answered) -> None: ...

    async def abandon(self, key: str) -> None:
        """The post was not applied (refused): the key is free again."""


def key_problem(key: str) -> str | None:
    if not KEY_PATTERN.match(key):
        return "must be 1 to 255 printable ASCII characters without spaces"
    return None


def body_digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class _Entry:
    digest: str
    started: float  # monotonic
    answer: Answered | None = None


class MemoryIdempotencyKeys:
    def __init__(self, limit: int = MEMORY_KEYS) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._limit = limit

    async def begin(self, key: str, digest: str) -> Answered | None:
        now = time.monotonic()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.started <= IDEMPOTENCY_WINDOW_SECONDS and len(self._entries) < self._limit:
                break
            self._entries.popitem(last=False)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.digest != digest:
                raise KeyReused
            if entry.answer is not None:
                return entry.answer
            if now - entry.started < IN_PROGRESS_SECONDS:
                raise KeyInProgress
        self._entries[key] = _Entry(digest, now)
        return None

    async def finish(self, key: str, answer: Answered) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.answer = answer

    async def abandon(self, key: str) -> None:
        self._entries.pop(key, None)
