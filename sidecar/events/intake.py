"""The one intake: every channel (the WebSocket link, `POST /v1/events`, log lines) hands its decoded batches to
`Intake.take`, which counts them, applies the acknowledgements at once, admits the batch (backpressure, one policy
expressed per channel), then tallies and applies the session events in arrival order as one batch.

Backpressure: nothing accepted is ever dropped, and memory stays bounded. A channel that can wait (the link: it
stops reading and TCP pushes back; log lines: the reader pauses) waits for the database writer to catch up; a
channel that cannot (HTTP) is refused with `Busy` (429 and Retry-After) when the steps the batch may cause do not
fit in the pending queue.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from sidecar.events.schema import (
    CommandAck,
    InboundMessage,
    RuntimeInfo,
    SessionEvent,
    wire_name,
)
from sidecar.runtime import SessionRuntime

YIELD_EVERY = 100  # events between yields to the loop: a big frame must not starve the API and other connections
STEPS_PER_EVENT = 2  # an event causes at most two database steps (its count, and a close's or heal's)


class Backpressure(Enum):
    WAIT = "wait"  # the channel waits for room (it stops reading)
    REFUSE = "refuse"  # the channel is told to retry later (HTTP 429)


class Channel(Enum):
    """Where a batch came from: the `channel` label of whatsapp_sidecar_events_total, and its backpressure."""

    WEBSOCKET = ("websocket", Backpressure.WAIT)
    HTTP = ("http", Backpressure.REFUSE)
    LOGS = ("logs", Backpressure.WAIT)

    def __init__(self, label: str, backpressure: Backpressure) -> None:
        self.label = label
        self.backpressure = backpressure


class Busy(Exception):
    """The batch was not taken (a REFUSE channel with no room): nothing of it was applied."""


class IntakeMetrics(Protocol):
    """The counters the intake keeps (telemetry/metrics.py's SidecarMetrics)."""

    @property
    def events(self) -> Any: ...

    @property
    def events_rejected(self) -> Any: ...

    @property
    def events_throttled(self) -> Any: ...


@dataclass(frozen=True)
class Admission:
    """How the intake knows there is room: `caught_up` waits until the database writer is within its lag
    target; `room` is how many more steps the pending queue takes (less what undecided events may still cause)."""

    caught_up: Callable[[], Awaitable[None]]
    room: Callable[[], int]


class Intake:
    def __init__(
        self,
        runtime: SessionRuntime,
        acknowledge: Callable[[CommandAck], None],
        admission: Admission,
        metrics: IntakeMetrics,
    ) -> None:
        self._runtime = runtime
        self._acknowledge = acknowledge
        self._admission = admission
        self._metrics = metrics
        self._event_children: dict[tuple[type, str], Any] = {}
        self.frames_rejected = 0

    def rejected(self, reason: str) -> None:
        """A frame, body or log event refused whole (`reason`: the label of whatsapp_sidecar_events_rejected)."""
        self.frames_rejected += 1
        self._metrics.events_rejected.labels(reason).inc()

    async def take(self, messages: Sequence[InboundMessage], channel: Channel) -> int:
        """Take one validated batch; returns how many session events were applied. Raises Busy (REFUSE channels)."""
        return await self.apply(await self.admit(messages, channel))

    async def admit(self, messages: Sequence[InboundMessage], channel: Channel) -> list[SessionEvent]:
        """Count the batch, apply its acknowledgements, wait for room (or raise Busy); its session events, to be
        handed to `apply` (the link claims their phones in between)."""
        if channel.backpressure is Backpressure.REFUSE:
            await self._admission.caught_up()  # what is accepted becomes durable within the lag target
            if self._admission.room() < STEPS_PER_EVENT * len(messages):
                self._metrics.events_throttled.inc(len(messages))
                raise Busy
        self._count(messages, channel)
        events: list[SessionEvent] = []
        for message in messages:
            if type(message) is CommandAck:
                self._acknowledge(message)  # closes in flight wait for them: never held behind the batch
            elif type(message) is not RuntimeInfo:  # the link reads it before the intake (a connection's own)
                events.append(message)  # type: ignore[arg-type]  # every other message is a session event
        if events and channel.backpressure is Backpressure.WAIT:
            await self._admission.caught_up()  # not reading meanwhile: the sender is pushed back
        return events

    async def apply(self, events: list[SessionEvent], origin: tuple[str, int] | None = None) -> int:
        """In arrival order, as one batch. Errors and opens that change no decision are tallied (runtime/tally.py), each
        phone's tally flushed before anything else of that phone is applied, so every session sees its events in
        order. `origin`: the link frame's runtime id and highest seq (remembered with the decisions)."""
        if not events:
            return 0
        async with self._runtime.batch(origin):
            return await self._apply(events)

    async def _apply(self, events: list[SessionEvent]) -> int:
        runtime = self._runtime
        tally = runtime.error_tally()  # None with a tracing exporter: every error then gets its own span
        count = 0
        for event in events:
            count += 1
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if tally is not None:
                if tally.takes(event):
                    continue
                tally.flush(event.organization_phone_id)
            await runtime.apply(event)
        if tally is not None:
            tally.flush_all()
        return count

    def _count(self, messages: Sequence[InboundMessage], channel: Channel) -> None:
        """whatsapp_sidecar_events_total, incremented once per message type of the batch."""
        for kind, count in Counter(map(type, messages)).items():  # counted in C
            key = (kind, channel.label)  # a str hashes in C; an Enum member's hash is a Python call
            child = self._event_children.get(key)
            if child is None:
                child = self._metrics.events.labels(wire_name(kind), channel.label)
                self._event_children[key] = child
            child.inc(count)
