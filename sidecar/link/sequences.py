"""At-least-once delivery on the runtime link, made exactly-once where the sidecar can tell: events carry a `seq`
per runtime id (`runtime.info`), the sidecar ignores one it has already taken and answers `events.ack upTo` once
everything up to it is durable; the runtime keeps what is not acknowledged and sends it again after a reconnect.

Per runtime id (or, without one, per connection) this replica remembers the highest seq taken and acknowledged.
In fleet mode each frame's highest seq is written to PostgreSQL with the frame's decisions, in their transaction,
and again when acknowledged (ports.SharedSequences), so a replica the runtime reconnects to (or this one,
restarted after a SIGKILL) knows what was taken; a SIGTERM acknowledges everything read before the link closes.
The acknowledgement's own write is made at most every SHARED_ACK_SECONDS per runtime id: what it adds to the
decisions' record covers frames that decided nothing (activity reports), which a runtime only resends if they were
never acknowledged to it, and which change nothing when taken twice. An idle fleet's activity reports so cost at
most one row write per runtime id per interval, not one per frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sidecar.events.schema import InboundMessage, RuntimeInfo
from sidecar.ports import StoreUnavailable

log = logging.getLogger("sidecar.link")


class SharedSequences(Protocol):
    """Fleet mode: each runtime id's acknowledged seq, shared by the replicas (store/leases.py)."""

    async def acknowledged(self, runtime_id: str) -> int: ...

    async def acknowledge(self, runtime_id: str, up_to: int) -> None: ...


@dataclass
class Progress:
    """One runtime id's (or connection's) sequence numbers as this replica knows them."""

    taken: int = 0
    acked: int = 0
    shared_at: float = float("-inf")  # monotonic time of the last shared write of `acked`


class LinkSequences:
    def __init__(self, shared: SharedSequences | None = None) -> None:
        self._shared = shared
        self._progress: dict[str, Progress] = {}

    def progress(self, key: str) -> Progress:
        found = self._progress.get(key)
        if found is None:
            if len(self._progress) >= RUNTIMES_KEPT:  # bounded: the longest-known runtime id goes first
                self._progress.pop(next(iter(self._progress)))
            found = self._progress[key] = Progress()
        return found

    async def identified(self, key: str) -> Progress:
        """A runtime id seen on a new connection: what another replica acknowledged for it counts as taken."""
        progress = self.progress(key)
        if self._shared is not None and not key.startswith(CONNECTION_KEY):
            try:
                shared = await self._shared.acknowledged(key)
            except StoreUnavailable as error:  # the database away: this replica's own memory is all there is
                log.warning("cannot read the runtime's acknowledged events (%s); resent ones may count twice", error)
            else:
                progress.taken = max(progress.taken, shared)
                progress.acked = max(progress.acked, shared)
        return progress

    def forget_connection(self, key: str) -> None:
        if key.startswith(CONNECTION_KEY):
            self._progress.pop(key, None)

    async def acknowledged(self, key: str, up_to: int) -> None:
        progress = self.progress(key)
        progress.acked = max(progress.acked, up_to)
        now = time.monotonic()
        if (
            self._shared is not None
            and not key.startswith(CONNECTION_KEY)
            and now - progress.shared_at >= (SHARED_ACK_SECONDS)
        ):
            progress.shared_at = now
            try:
                await self._shared.acknowledge(key, up_to)
            except StoreUnavailable as error:
                log.warning("cannot store the runtime's acknowledged events (%s)", error)


CONNECTION_KEY = "connection:"
SHARED_ACK_SECONDS = 5.0
RUNTIMES_KEPT = 10_000


def runtime_info(messages: Sequence[InboundMessage]) -> RuntimeInfo | None:
    """A frame's `runtime.info`: its first message (a runtime sends it first, usually as a frame of its own)."""
    first = messages[0] if messages else None
    return first if type(first) is RuntimeInfo else None


def fresh(messages: list[InboundMessage], progress: Progress) -> tuple[list[InboundMessage], int | None]:
    """The messages not taken before (by seq), and the frame's highest seq; moves `taken` past them."""
    if not messages:
        return messages, None
    first, last = getattr(messages[0], "seq", None), getattr(messages[-1], "seq", None)
    if first is None and last is None:
        return messages, None  # a runtime without sequence numbers (a frame is one runtime's, all or none)
    if first is not None and last is not None and progress.taken < first <= last:
        progress.taken = last  # the common case: a new frame, its seqs increasing (as the SDK and adapter send)
        return messages, last
    kept: list[InboundMessage] = []
    top: int | None = None
    for message in messages:
        seq = getattr(message, "seq", None)
        if seq is not None:
            top = seq if top is None else max(top, seq)
            if seq <= progress.taken:
                continue  # sent again after a reconnect, taken already
            progress.taken = seq
        kept.append(message)
    return kept, top
