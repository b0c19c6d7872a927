"""Runtime link protocol v1: the event objects runtimes send, validated before anything in a frame is applied.

The event objects are frozen msgspec structs (built in C: a storm builds hundreds of thousands a second).

A frame (or an HTTP body) holds one JSON object or a JSON array of them. Keys are camelCase; unknown keys are
ignored so that runtimes can add fields without breaking older sidecars.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, TypedDict

import msgspec

from sidecar.rules.classification import ErrorSource
from sidecar.rules.inputs import (
    CONNECTION_STATES,
    JID_PROBLEM,
    IntegerTooLong,
    bounded_int,
    id_problem,
    text_problem,
    user_of_jid,
)
from sidecar.rules.jid import InvalidJid

MAX_EVENTS_PER_FRAME = 10_000
MAX_ERROR_TEXT = 16_384
MAX_COUNT = 1_000_000_000
SOURCES = tuple(source.value for source in ErrorSource)
MESSAGE_TYPES = ("pkmsg", "msg", "skmsg")
COLLECTION_PATTERN = re.compile(r"^[a-z_]{1,64}\Z")
TRACEPARENT_PATTERN = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")


class Problem(TypedDict):
    index: int
    field: str
    problem: str


class FrameInvalid(ValueError):
    def __init__(self, error: str, details: list[Problem] | None = None, reason: str = "invalid") -> None:
        super().__init__(error)
        self.error = error
        self.details = details or []
        self.reason = reason  # the `reason` label of whatsapp_sidecar_events_rejected_total

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "details": list(self.details)}


class ConnectionUpdate(msgspec.Struct, frozen=True):
    organization_id: int
    organization_phone_id: int
    phone_jid: str
    connection: str
    status_code: int | None = None
    at: datetime | None = None
    traceparent: str | None = None
    # The runtime paired this phone anew (QR scan) since it last closed: an open after a sidecar logout is
    # then a real re-login, not a logout that failed to stick.
    new_login: bool = False


class DecryptError(msgspec.Struct, frozen=True):
    organization_id: int
    organization_phone_id: int
    phone_jid: str
    error: str
    source: ErrorSource | None = None
    peer_jid: str | None = None
    message_type: str | None = None
    at: datetime | None = None
    traceparent: str | None = None
    collection: str | None = None  # app-state collection (Baileys' patch name), for source app-state


class Activity(msgspec.Struct, frozen=True):
    """Inbound traffic since the runtime's last report (sent only for sessions that had any)."""

    organization_id: int
    organization_phone_id: int
    phone_jid: str
    messages: int
    receipts: int
    notifications: int
    last_inbound_at: datetime
    at: datetime | None = None
    traceparent: str | None = None


class CommandAck(msgspec.Struct, frozen=True):
    command_id: str
    ok: bool
    error: str | None = None
    round_trip_ms: float | None = None  # session.probe: the measured round trip with WhatsApp's server


SessionEvent = ConnectionUpdate | DecryptError | Activity
InboundMessage = ConnectionUpdate | DecryptError | Activity | CommandAck


class _Reader:
    """Reads one event object, collecting every problem instead of stopping at the first."""

    def __init__(self, index: int, item: dict[str, Any], problems: list[Problem]) -> None:
        self.index, self.item, self.problems = index, item, problems

    def fail(self, field: str, problem: str) -> None:
        self.problems.append({"index": self.index, "field": field, "problem": problem})

    def positive_int(self, field: str) -> int:
        value = self.item.get(field)
        problem = id_problem(value)
        if problem is not None:
            self.fail(field, problem if field in self.item else "is required")
            return 0
        assert isinstance(value, int)
        return value

    def text(self, field: str, *, required: bool = True, max_length: int = 256) -> str | None:
        value = self.item.get(field)
        if value is None:
            if required:
                self.fail(field, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(field, "must be a non-empty string")
            return None
        if len(value) > max_length:
            self.fail(field, f"must be at most {max_length} characters")
            return None
        if (problem := text_problem(value)) is not None:
            self.fail(field, problem)
            return None
        return value

    def choice(self, field: str, choices: tuple[str, ...], *, required: bool) -> str | None:
        value = self.text(field, required=required)
        if value is not None and value not in choices:
            self.fail(field, f"must be one of {', '.join(choices)}")
            return None
        return value

    def jid(self, field: str, *, required: bool) -> str | None:
        value = self.text(field, required=required)
        if value is not None:
            try:
                user_of_jid(value)
            except InvalidJid:
                self.fail(field, JID_PROBLEM)
                return None
        return value

    def timestamp(self, field: str) -> datetime | None:
        value = self.text(field, required=False, max_length=64)
        if value is None:
            return None
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            self.fail(field, "must be an RFC 3339 timestamp with a time zone")
            return None
        return parsed

    def traceparent(self) -> str | None:
        value = self.text("traceparent", required=False, max_length=55)
        if value is not None and not TRACEPARENT_PATTERN.match(value):
            self.fail("traceparent", "must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
            return None
        return value

    def count(self, field: str) -> int:
        """A count since the last report: 0 when absent."""
        value = self.item.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            self.fail(field, f"must be an integer from 0 to {MAX_COUNT}")
            return 0
        return value

    def status_code(self) -> int | None:
        value = self.item.get("statusCode")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
            self.fail("statusCode", "must be an integer from 100 to 599")
            return None
        return value


def _read(index: int, item: object, problems: list[Problem]) -> InboundMessage | None:
    if not isinstance(item, dict):
        problems.append({"index": index, "field": "", "problem": "must be a JSON object"})
        return None
    r = _Reader(index, item, problems)
    before = len(problems)
    kind = item.get("type")
    if kind == "command.ack":
        command_id = r.text("commandId")
        ok = item.get("ok")
        if not isinstance(ok, bool):
            r.fail("ok", "must be true or false")
        error = item.get("error")
        if error is not None and not isinstance(error, str):
            r.fail("error", "must be a string or null")
        round_trip = item.get("roundTripMs")
        if round_trip is not None and (
            isinstance(round_trip, bool) or not isinstance(round_trip, int | float) or not 0 <= round_trip <= 1e7
        ):
            r.fail("roundTripMs", "must be a number of milliseconds from 0 to 10000000")
        if len(problems) > before:
            return None
        return CommandAck(str(command_id), bool(ok), error, None if round_trip is None else float(round_trip))
    if kind not in ("connection.update", "decrypt.error", "activity"):
        r.fail("type", "must be one of connection.update, decrypt.error, activity, command.ack")
        return None
    organization_id = r.positive_int("organizationId")
    phone_id = r.positive_int("organizationPhoneId")
    phone_jid = r.jid("phoneJid", required=True)
    at = r.timestamp("at")
    traceparent = r.traceparent()
    if kind == "connection.update":
        connection = r.choice("connection", CONNECTION_STATES, required=True)
        status_code = r.status_code()
        new_login = item.get("isNewLogin", False)
        if not isinstance(new_login, bool):
            r.fail("isNewLogin", "must be true or false")
        if len(problems) > before:
            return None
        return ConnectionUpdate(
            organization_id, phone_id, str(phone_jid), str(connection), status_code, at, traceparent, bool(new_login)
        )
    if kind == "activity":
        messages, receipts, notifications = (r.count(n) for n in ("messages", "receipts", "notifications"))
        last_inbound_at = r.timestamp("lastInboundAt")
        if last_inbound_at is None and item.get("lastInboundAt") is None:
            r.fail("lastInboundAt", "is required (an RFC 3339 timestamp with a time zone)")
        if len(problems) > before or last_inbound_at is None:
            return None
        return Activity(
            organization_id, phone_id, str(phone_jid), messages, receipts, notifications, last_inbound_at, at,
            traceparent,
        )  # fmt: skip
    error_text = r.text("error", max_length=MAX_ERROR_TEXT)
    source = r.choice("source", SOURCES, required=False)
    peer_jid = r.jid("peerJid", required=False)
    message_type = r.choice("messageType", MESSAGE_TYPES, required=False)
    collection = r.text("collection", required=False, max_length=64)
    if collection is not None and not COLLECTION_PATTERN.match(collection):
        r.fail("collection", "must be an app-state collection name (lowercase letters and _)")
    if len(problems) > before:
        return None
    return DecryptError(
        organization_id,
        phone_id,
        str(phone_jid),
        str(error_text),
        ErrorSource(source) if source else None,
        peer_jid,
        message_type,
        at,
        traceparent,
        collection,
    )


def parse_messages(payload: object) -> list[InboundMessage]:
    """Validate a decoded frame or body; raises FrameInvalid listing every problem, and returns nothing then."""
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise FrameInvalid("empty batch: send at least one event")
    if len(items) > MAX_EVENTS_PER_FRAME:
        raise FrameInvalid(
            f"batch of {len(items)} events; at most {MAX_EVENTS_PER_FRAME} per frame", reason="too_many_events"
        )
    problems: list[Problem] = []
    messages = [_read(index, item, problems) for index, item in enumerate(items)]
    if problems:
        noun = "event" if len(items) == 1 else "events"
        raise FrameInvalid(f"invalid {noun}; nothing was applied", problems)
    return [message for message in messages if message is not None]


def decode_json(text: str, what: str) -> object:
    """JSON with bounded integers; anything that does not decode is a FrameInvalid naming why."""
    try:
        return json.loads(text, parse_int=bounded_int)
    except IntegerTooLong as error:
        raise FrameInvalid(f"{what} holds {error}", reason="malformed") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as error:
        raise FrameInvalid(f"{what} is not JSON: {error}", reason="malformed") from None


def parse_text(text: str, what: str = "frame") -> list[InboundMessage]:
    return parse_messages(decode_json(text, what))
