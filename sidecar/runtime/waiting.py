"""Events waiting for a fleet decision: what they are, how one line of the undecided-events journal holds one,
and who waits for their results. Pure data and JSON; no I/O."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from opentelemetry.context import Context

from sidecar.rules.policy import BadDecrypt, BadMac, ConnectionClosed, ConnectionOpened, Event
from sidecar.rules.records import CounterKind, Notification, PhoneRef

Result = tuple[bool, Notification | None]  # the session continues; the health flip's notification


@dataclass(frozen=True, slots=True)
class Traced:
    """An event's trace context, and what to do once its decision is carried out (describe and end its span)."""

    context: Context
    decided: Callable[[bool], None]


@dataclass(frozen=True, slots=True)
class Waiting:
    """One event for the decider: a counted error, an open or a close, with its original time."""

    phone: PhoneRef
    event: Event
    counted: CounterKind | None
    at: float
    new_login: bool = False
    traced: Traced | None = None
    # The last event a runtime link frame brought (its runtime id and highest seq): remembered with its decision,
    # so a replica the runtime resends to knows the frame was taken (link/sequences.py).
    origin: tuple[str, int] | None = None


def waiting_to_json(item: Waiting) -> str:
    """One line of the undecided-events journal (what a restart replays)."""
    event = item.event
    kind = type(event).__name__
    payload: dict[str, object] = {"phone": asdict(item.phone), "kind": kind, "at": item.at, "newLogin": item.new_login}
    if isinstance(event, BadMac):
        payload["peer"] = event.peer_user
        if event.pending or event.late:  # loss-aware (rules/policy.py); absent in lines of earlier releases
            payload["pending"], payload["late"] = event.pending, event.late
    if isinstance(event, ConnectionClosed):
        payload["statusCode"] = event.status_code
    payload["counted"] = str(item.counted) if item.counted is not None else None
    if item.origin is not None:
        payload["origin"] = list(item.origin)
    return json.dumps(payload)


def waiting_from_json(text: str) -> Waiting:
    data = json.loads(text)
    at = float(data["at"])
    kind = data["kind"]
    event: Event
    if kind == "BadMac":
        event = BadMac(data.get("peer"), at, pending=bool(data.get("pending")), late=bool(data.get("late")))
    elif kind == "BadDecrypt":
        event = BadDecrypt(at)
    elif kind == "ConnectionOpened":
        event = ConnectionOpened()
    elif kind == "ConnectionClosed":
        event = ConnectionClosed(data.get("statusCode"))
    else:
        raise ValueError(f"unknown waiting event {kind!r}")
    counted = CounterKind(data["counted"]) if data.get("counted") else None
    origin = (str(data["origin"][0]), int(data["origin"][1])) if data.get("origin") else None
    return Waiting(PhoneRef(**data["phone"]), event, counted, at, bool(data.get("newLogin")), origin=origin)


class EventJournal(Protocol):
    """The undecided events, on disk (sidecar.store.journal), so a SIGKILL while PostgreSQL is away loses none."""

    instance_id: str
    last_position: int

    def load(self) -> list[tuple[int, Waiting]]: ...

    def append(self, entry: Waiting) -> int: ...

    def mark_applied(self, position: int, nothing_pending: bool) -> None: ...


@dataclass(slots=True)
class Submission:
    """Who waits for a group of events' results (until all are decided, or the database turns out away)."""

    count: int
    future: asyncio.Future[list[Result]]
    results: list[Result] = field(default_factory=list)

    def add(self, result: Result) -> None:
        if not self.future.done():
            self.results.append(result)
            if len(self.results) == self.count:
                self.future.set_result(self.results)

    def give_up(self) -> None:
        if not self.future.done():
            self.future.set_result(self.results)
