"""The hand-written reader of runtime link v1: the contract's oracle. It names every problem of a frame (index,
field, problem in words) and builds the same structs as the fast path (events/decode.py), which hands it
anything it cannot vouch for. Unknown keys are ignored.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from sidecar.events.schema import (
    COLLECTION_PATTERN,
    INBOUND,
    MAX_EVENTS_PER_FRAME,
    MAX_TEXT,
    MAX_TIMESTAMP,
    TRACEPARENT_PATTERN,
    InboundMessage,
    LinkError,
    Problem,
    Timestamp,
    wire_name,
)
from sidecar.rules.inputs import (
    JID_PROBLEM,
    MAX_ID,
    IntegerTooLong,
    bounded_int,
    id_problem,
    text_problem,
    user_of_jid,
)
from sidecar.rules.jid import InvalidJid

# The schema's patterns, anchored at the very end (`$` would let a trailing newline through).
COLLECTION = re.compile(COLLECTION_PATTERN.removesuffix("$") + r"\Z")
TRACEPARENT = re.compile(TRACEPARENT_PATTERN.removesuffix("$") + r"\Z")
TYPES = ", ".join(wire_name(kind) for kind in INBOUND)


class FrameInvalid(ValueError):
    def __init__(self, error: str, details: list[Problem] | None = None, reason: str = "invalid") -> None:
        super().__init__(error)
        self.error = error
        self.details = details or []
        self.reason = reason  # the `reason` label of whatsapp_sidecar_events_rejected_total

    def answer(self) -> LinkError:
        """What the link answers a refused frame with."""
        return LinkError(error=self.error, details=list(self.details))

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "details": list(self.details)}


def parse_timestamp(value: str) -> Timestamp | None:
    """An RFC 3339 timestamp with a zone (what both paths accept), or None."""
    try:
        parsed = Timestamp.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


_MISSING = object()


@dataclass(frozen=True, slots=True)
class _Field:
    """One field of a message as the reader checks it, read off the schema's struct."""

    name: str  # the struct's attribute
    key: str  # the wire name
    kind: str  # "id", "int", "float", "bool", "text", "choice", "jid", "timestamp", "free"
    required: bool
    nullable: bool
    default: Any
    low: float | None = None
    high: float | None = None
    max_length: int = MAX_TEXT
    pattern: re.Pattern[str] | None = None
    choices: tuple[Any, ...] = ()
    convert: Callable[[Any], Any] | None = None
    problem: str | None = None  # the wording of a failed range or pattern, where the schema gives one


def _fields(kind: type[msgspec.Struct]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(kind, include_extras=True)
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    return tuple(_field(field, hints[field.name]) for field in info.fields)


def _field(field: msgspec.inspect.Field, hint: Any) -> _Field:
    node, nullable = field.type, False
    if isinstance(node, msgspec.inspect.UnionType):
        nullable = any(isinstance(t, msgspec.inspect.NoneType) for t in node.types)
        (node,) = [t for t in node.types if not isinstance(t, msgspec.inspect.NoneType)]
    extra: dict[str, Any] = {}
    if isinstance(node, msgspec.inspect.Metadata):
        extra, node = node.extra or {}, node.type
    default = None if field.default is msgspec.NODEFAULT else field.default
    common: dict[str, Any] = {
        "name": field.name,
        "key": field.encode_name,
        "required": field.required,
        "nullable": nullable,
        "default": default,
        "problem": extra.get("problem"),
    }
    if isinstance(node, msgspec.inspect.IntType):
        kind = "id" if field.required and node.ge == 1 and node.le == MAX_ID else "int"
        return _Field(kind=kind, low=node.ge, high=node.le, **common)
    if isinstance(node, msgspec.inspect.FloatType):
        return _Field(kind="float", low=node.ge, high=node.le, convert=float, **common)
    if isinstance(node, msgspec.inspect.BoolType):
        return _Field(kind="bool", **common)
    if isinstance(node, msgspec.inspect.LiteralType):  # in the order the schema declares them
        values = next(typing.get_args(a) for a in _flat(hint) if typing.get_origin(a) is typing.Literal)
        return _Field(kind="choice", choices=values, **common)
    if isinstance(node, msgspec.inspect.EnumType):
        return _Field(kind="choice", choices=tuple(item.value for item in node.cls), convert=node.cls, **common)
    if isinstance(node, msgspec.inspect.CustomType) and node.cls is Timestamp:
        return _Field(kind="timestamp", max_length=MAX_TIMESTAMP, **common)
    assert isinstance(node, msgspec.inspect.StrType), f"{field.name}: a type the reader does not know"
    kind = "jid" if extra.get("check") == "jid" else "free" if extra.get("free") else "text"
    raw_pattern = node.pattern or extra.get("pattern")  # a pattern the fast decoder checks on its own
    pattern = re.compile(raw_pattern.removesuffix("$") + r"\Z") if raw_pattern else None
    return _Field(kind=kind, max_length=node.max_length or MAX_TEXT, pattern=pattern, **common)


def _flat(hint: Any) -> list[Any]:
    """A hint's alternatives, through Optional and Annotated."""
    if typing.get_origin(hint) is typing.Annotated:
        return _flat(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [flat for arg in typing.get_args(hint) for flat in _flat(arg)]
    return [hint]


_MESSAGES: dict[str, tuple[type[msgspec.Struct], tuple[_Field, ...]]] = {
    wire_name(kind): (kind, _fields(kind)) for kind in INBOUND
}


class _Reader:
    """Reads one event object, collecting every problem instead of stopping at the first."""

    def __init__(self, index: int, item: dict[str, Any], problems: list[Problem]) -> None:
        self.index, self.item, self.problems = index, item, problems

    def fail(self, field: str, problem: str) -> None:
        self.problems.append({"index": self.index, "field": field, "problem": problem})

    def text(self, field: _Field) -> str | None:
        value = self.item.get(field.key)
        if value is None:
            if field.required and field.kind != "timestamp":
                self.fail(field.key, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(field.key, "must be a non-empty string")
            return None
        if len(value) > field.max_length:
            self.fail(field.key, f"must be at most {field.max_length} characters")
            return None
        if (problem := text_problem(value)) is not None:
            self.fail(field.key, problem)
            return None
        return value

    def read(self, field: _Field) -> Any:
        """The field's value, or _MISSING after naming its problem."""
        item, key = self.item, field.key
        if field.kind == "id":
            value = item.get(key)
            if (problem := id_problem(value)) is not None:
                self.fail(key, problem if key in item else "is required")
                return _MISSING
            return value
        if field.kind in ("int", "float"):
            value = item.get(key, field.default)
            if value is None and field.nullable:
                return None
            number = int | float if field.kind == "float" else int
            low, high = field.low, field.high
            assert low is not None and high is not None  # every number of the schema is bounded
            if isinstance(value, bool) or not isinstance(value, number) or not low <= value <= high:
                self.fail(key, field.problem or f"must be an integer from {low} to {high}")
                return _MISSING
            return field.convert(value) if field.convert else value
        if field.kind == "bool":
            value = item.get(key, field.default)
            if not isinstance(value, bool):
                self.fail(key, "must be true or false")
                return _MISSING
            return value
        if field.kind == "free":
            value = item.get(key)
            if value is not None and not isinstance(value, str):
                self.fail(key, "must be a string or null")
                return _MISSING
            return value
        before = len(self.problems)
        text = self.text(field)
        if text is None:
            if field.kind == "timestamp" and field.required and item.get(key) is None:
                self.fail(key, "is required (an RFC 3339 timestamp with a time zone)")
            return _MISSING if len(self.problems) > before else None
        if field.kind == "choice":
            if text not in field.choices:
                self.fail(key, f"must be one of {', '.join(field.choices)}")
                return _MISSING
            return field.convert(text) if field.convert else text
        if field.kind == "jid":
            try:
                user_of_jid(text)
            except InvalidJid:
                self.fail(key, JID_PROBLEM)
                return _MISSING
            return text
        if field.kind == "timestamp":
            parsed = parse_timestamp(text)
            if parsed is None:
                self.fail(key, "must be an RFC 3339 timestamp with a time zone")
                return _MISSING
            return parsed
        if field.pattern is not None and not field.pattern.match(text):
            self.fail(key, field.problem or f"must match {field.pattern.pattern}")
            return _MISSING
        return text


def _read(index: int, item: object, problems: list[Problem]) -> InboundMessage | None:
    if not isinstance(item, dict):
        problems.append({"index": index, "field": "", "problem": "must be a JSON object"})
        return None
    r = _Reader(index, item, problems)
    tag = item.get("type")
    message = _MESSAGES.get(tag) if isinstance(tag, str) else None
    if message is None:
        r.fail("type", f"must be one of {TYPES}")
        return None
    kind, fields = message
    before = len(problems)
    values = {field.name: r.read(field) for field in fields}
    if len(problems) > before:
        return None
    built = kind(**{name: value for name, value in values.items() if value is not None})
    return built  # type: ignore[return-value]  # one of INBOUND


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
