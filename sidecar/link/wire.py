"""Runtime link v1 on the wire: msgspec structs that decode a frame in C, the fast path of link/protocol.py.

msgspec checks the shape (the `type` tag, types, ranges, enums); the few checks it cannot express (a JID, a
storable non-blank string, a timestamp with a zone, a traceparent) run in Python on the decoded fields, with the
same functions the hand-written reader uses. Anything either step refuses, and anything the fast path cannot be
sure of (an empty or oversized batch; a key it does not know, which the reader ignores unless it holds an
integer of more than 20 digits, which the reader refuses), goes to the reader, which names every problem.
Integers can then only sit in typed fields, where msgspec's ranges refuse any of more than 20 digits. So the fast
path accepts only what the reader accepts, with the same result (tests/test_wire.py checks that with generated
frames); it never produces an error of its own. A runtime that adds fields of its own gets the reader's speed.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from sidecar.link.protocol import (
    COLLECTION_PATTERN,
    MAX_COUNT,
    MAX_ERROR_TEXT,
    MAX_EVENTS_PER_FRAME,
    TRACEPARENT_PATTERN,
    Activity,
    CommandAck,
    ConnectionUpdate,
    DecryptError,
    InboundMessage,
    parse_text,
)
from sidecar.rules.classification import ErrorSource
from sidecar.rules.inputs import MAX_ID, text_problem, user_of_jid
from sidecar.rules.jid import InvalidJid

Id = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
_SOURCES = {source.value: source for source in ErrorSource}
# Strings that passed the Python checks: a fleet's JIDs and error texts repeat on every event. Bounded (cleared
# when full; only short texts are kept), so fresh strings cost memory no matter how many come.
_ACCEPTED_LIMIT = 16_384
_ACCEPTED_LENGTH = 256
_accepted_jids: set[str] = set()
_accepted_errors: set[str] = set()


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", rename="camel", forbid_unknown_fields=True):
    organization_id: Id
    organization_phone_id: Id
    phone_jid: str
    at: str | None = None
    traceparent: str | None = None


class WireConnectionUpdate(_Event, frozen=True, tag="connection.update"):
    connection: Literal["connecting", "open", "close"]
    status_code: Annotated[int, msgspec.Meta(ge=100, le=599)] | None = None
    is_new_login: bool = False


class WireDecryptError(_Event, frozen=True, tag="decrypt.error"):
    error: str
    source: Literal["message", "app-state", "media"] | None = None
    peer_jid: str | None = None
    message_type: Literal["pkmsg", "msg", "skmsg"] | None = None
    collection: str | None = None


class WireActivity(_Event, frozen=True, tag="activity"):
    last_inbound_at: str
    messages: Count = 0
    receipts: Count = 0
    notifications: Count = 0


class WireCommandAck(
    msgspec.Struct, frozen=True, tag_field="type", tag="command.ack", rename="camel", forbid_unknown_fields=True
):
    command_id: str
    ok: bool
    error: str | None = None
    round_trip_ms: Annotated[float, msgspec.Meta(ge=0, le=1e7)] | None = None


WireMessage = WireConnectionUpdate | WireDecryptError | WireActivity | WireCommandAck
_decoder = msgspec.json.Decoder(list[WireMessage] | WireMessage)


class NotFast(Exception):
    """The fast path cannot vouch for this frame: the reader decides (and names the problems)."""


def parse_frame(text: str, what: str = "frame") -> list[InboundMessage]:
    """A frame's or body's messages: the fast path when it can vouch for them, else the reader (which raises
    FrameInvalid naming every problem)."""
    fast = decode_fast(text)
    return fast if fast is not None else parse_text(text, what)


def decode_fast(data: str | bytes) -> list[InboundMessage] | None:
    """The frame's messages, or None when the reader must look at it."""
    try:
        decoded = _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    items = decoded if isinstance(decoded, list) else [decoded]
    if not items or len(items) > MAX_EVENTS_PER_FRAME:
        return None
    try:
        return [_message(item) for item in items]
    except NotFast:
        return None


def _message(item: WireMessage) -> InboundMessage:
    if isinstance(item, WireCommandAck):
        _text(item.command_id, 256)
        return CommandAck(item.command_id, item.ok, item.error, item.round_trip_ms)
    _jid(item.phone_jid)
    at = _timestamp(item.at) if item.at is not None else None
    if item.traceparent is not None:
        _text(item.traceparent, 55)
        _match(TRACEPARENT_PATTERN, item.traceparent)
    if isinstance(item, WireConnectionUpdate):
        return ConnectionUpdate(
            item.organization_id, item.organization_phone_id, item.phone_jid, item.connection, item.status_code,
            at, item.traceparent, item.is_new_login,
        )  # fmt: skip
    if isinstance(item, WireDecryptError):
        if item.error not in _accepted_errors:
            _text(item.error, MAX_ERROR_TEXT)
            _accept(_accepted_errors, item.error)
        if item.peer_jid is not None:
            _jid(item.peer_jid)
        if item.collection is not None:
            _text(item.collection, 64)
            _match(COLLECTION_PATTERN, item.collection)
        return DecryptError(
            item.organization_id, item.organization_phone_id, item.phone_jid, item.error,
            _SOURCES[item.source] if item.source is not None else None, item.peer_jid, item.message_type, at,
            item.traceparent, item.collection,
        )  # fmt: skip
    last_inbound = _timestamp(item.last_inbound_at)
    return Activity(
        item.organization_id, item.organization_phone_id, item.phone_jid, item.messages, item.receipts,
        item.notifications, last_inbound, at, item.traceparent,
    )  # fmt: skip


def _text(value: str, max_length: int) -> None:
    """The reader's `text` check: non-blank, at most `max_length`, storable."""
    if not value.strip() or len(value) > max_length or text_problem(value) is not None:
        raise NotFast


def _match(pattern: re.Pattern[str], value: str) -> None:
    if not pattern.match(value):
        raise NotFast


def _jid(value: str) -> None:
    if value in _accepted_jids:
        return
    _text(value, 256)
    try:
        user_of_jid(value)
    except InvalidJid:
        raise NotFast from None
    _accept(_accepted_jids, value)


def _accept(accepted: set[str], value: str) -> None:
    if len(value) <= _ACCEPTED_LENGTH:
        if len(accepted) >= _ACCEPTED_LIMIT:
            accepted.clear()
        accepted.add(value)


def _timestamp(value: str) -> datetime:
    _text(value, 64)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise NotFast from None
    if parsed.tzinfo is None:
        raise NotFast
    return parsed
