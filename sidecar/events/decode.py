"""Decoding runtime link v1 frames: msgspec builds the schema's structs in C (the fast path); the reader
(events/reader.py) is the oracle for anything the fast path cannot vouch for.

msgspec checks the shape (the `type` tag, types, ranges, enums, lengths); the checks it cannot express (a JID, a
storable non-blank string, a traceparent, an app-state collection) run in Python on the decoded fields, with the
same functions the reader uses, and timestamps are parsed by the reader's own parser (`dec_hook`). Anything either
step refuses, and anything the fast path cannot be sure of (an empty or oversized batch; a key it does not know,
which the reader ignores unless it holds an integer of more than 20 digits, which the reader refuses), goes to
the reader, which names every problem. Integers can then only sit in typed fields, where msgspec's ranges refuse
any of more than 20 digits. So the fast path accepts only what the reader accepts, with the same result
(tests check that with generated frames); it never produces an error of its own.

Log ingest hands over objects already built (`decode_objects`): the same checks, through `msgspec.convert`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from sidecar.events.reader import COLLECTION, TRACEPARENT, parse_messages, parse_text, parse_timestamp
from sidecar.events.schema import (
    MAX_DETAIL,
    MAX_ERROR_TEXT,
    MAX_EVENTS_PER_FRAME,
    MAX_TEXT,
    MAX_TIMESTAMP,
    AccountRestriction,
    CommandAck,
    DecryptError,
    InboundMessage,
    MessageRecovered,
    RuntimeInfo,
    Timestamp,
)
from sidecar.rules.inputs import text_problem, user_of_jid
from sidecar.rules.jid import InvalidJid

# Strings that passed the Python checks: a fleet's JIDs and error texts repeat on every event. Bounded (cleared
# when full; only short texts are kept), so fresh strings cost memory no matter how many come.
_ACCEPTED_LIMIT = 16_384
_ACCEPTED_LENGTH = 256
_accepted_jids: set[str] = set()
_accepted_errors: set[str] = set()


class NotFast(Exception):
    """The fast path cannot vouch for this frame: the reader decides (and names the problems)."""


def _timestamp_hook(kind: type, value: Any) -> Any:
    if kind is Timestamp:
        if type(value) is not str or len(value) > MAX_TIMESTAMP or text_problem(value) is not None:
            raise ValueError("not a timestamp the reader accepts")
        parsed = parse_timestamp(value)
        if parsed is None:
            raise ValueError("not an RFC 3339 timestamp with a time zone")
        return parsed
    raise NotImplementedError(kind)


_Frame = list[InboundMessage] | InboundMessage
_decoder = msgspec.json.Decoder(_Frame, dec_hook=_timestamp_hook)


def parse_frame(text: str | bytes, what: str = "frame") -> list[InboundMessage]:
    """A frame's or body's messages: the fast path when it can vouch for them, else the reader (which raises
    FrameInvalid naming every problem)."""
    fast = decode_fast(text)
    if fast is not None:
        return fast
    return parse_text(text if isinstance(text, str) else text.decode("utf-8", "surrogatepass"), what)


def decode_fast(data: str | bytes) -> list[InboundMessage] | None:
    """The frame's messages, or None when the reader must look at it."""
    try:
        decoded = _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return _vouched(decoded)


def decode_objects(items: Sequence[dict[str, Any]]) -> list[InboundMessage]:
    """Events built as JSON-like objects (log ingest): the fast path's checks, else the reader's verdict."""
    try:
        decoded = msgspec.convert(list(items), list[InboundMessage], dec_hook=_timestamp_hook, strict=True)
    except msgspec.ValidationError:
        decoded = None
    if decoded is not None:
        vouched = _vouched(decoded)
        if vouched is not None:
            return vouched
    return parse_messages(list(items))


def _vouched(decoded: _Frame) -> list[InboundMessage] | None:
    items = decoded if isinstance(decoded, list) else [decoded]
    if not items or len(items) > MAX_EVENTS_PER_FRAME:
        return None
    try:
        for item in items:
            _check(item)
    except NotFast:
        return None
    return items


def _check(item: InboundMessage) -> None:
    if isinstance(item, CommandAck):
        _text(item.command_id, MAX_TEXT)
        return
    if isinstance(item, RuntimeInfo):
        return  # msgspec checked all of it (printable ASCII is storable)
    _jid(item.phone_jid)
    if item.traceparent is not None:
        _text(item.traceparent, 55)
        _match(TRACEPARENT, item.traceparent)
    if type(item) is AccountRestriction:
        if item.detail is not None:
            _text(item.detail, MAX_DETAIL)
        return
    if type(item) is MessageRecovered:
        _message_id(item.message_id)
        return
    if type(item) is DecryptError:
        if item.message_id is not None:
            _message_id(item.message_id)
        if item.error not in _accepted_errors:
            _text(item.error, MAX_ERROR_TEXT)
            _accept(_accepted_errors, item.error)
        if item.peer_jid is not None:
            _jid(item.peer_jid)
        if item.collection is not None:
            _text(item.collection, 64)
            _match(COLLECTION, item.collection)


def _message_id(value: str) -> None:
    """MESSAGE_ID_PATTERN without `re` (msgspec checked the length): printable ASCII, no space."""
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise NotFast


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
    _text(value, MAX_TEXT)
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
