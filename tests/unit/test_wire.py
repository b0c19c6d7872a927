"""The msgspec fast path (events/decode.py) against the hand-written reader (events/reader.py), the contract's oracle:
on generated valid and invalid frames it accepts only what the reader accepts, with the same result, and a frame
it refuses gets the reader's errors, with the same {index, field, problem} details. The OpenAPI document and
the structs name the same fields."""

from __future__ import annotations

import json
import re
import typing
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.events.decode import decode_fast, parse_frame
from sidecar.events.reader import FrameInvalid, parse_text
from sidecar.events.schema import Activity as WireActivity
from sidecar.events.schema import CommandAck as WireCommandAck
from sidecar.events.schema import ConnectionUpdate as WireConnectionUpdate
from sidecar.events.schema import DecryptError as WireDecryptError
from sidecar.http import OPENAPI_PATH

JIDS = st.sampled_from(
    ["79001112233@s.whatsapp.net", "15550002222:7@s.whatsapp.net", "2055@lid", "x@s.whatsapp.net", "", " ", "a\x00b"]
)
IDS = st.one_of(st.integers(1, 2**31 - 1), st.sampled_from([0, -1, 2**31, True, 1.0, "7", None, 10**25]))
TEXTS = st.one_of(
    st.sampled_from(["Bad MAC", "bad decrypt", "", "   ", "x\x00", "\ud800", None, 5]), st.text(max_size=20)
)
TIMES = st.sampled_from(
    ["2026-11-25T03:52:37Z", "2026-11-25T03:52:37+02:00", "2026-11-25T03:52:37", "2026-11-25 03:52:37Z", "nope", 3]
)
TRACEPARENTS = st.sampled_from(["00-" + "a" * 32 + "-" + "b" * 16 + "-01", "00-xyz", "", None])
MISSING = object()
UNSURE = re.compile("\x00")


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value, or absent (MISSING)."""
    return st.one_of(st.just(MISSING), strategy)


@st.composite
def events(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["connection.update", "decrypt.error", "activity", "command.ack", "other", None]))
    fields: dict[str, Any] = {"type": kind}
    if kind == "command.ack":
        fields |= {
            "commandId": draw(TEXTS),
            "ok": draw(st.sampled_from([True, False, None, 1])),
            "error": draw(maybe(TEXTS)),
            "roundTripMs": draw(maybe(st.sampled_from([0, 4.5, -1, 1e8, True]))),
        }
    else:
        fields |= {
            "organizationId": draw(maybe(IDS)),
            "organizationPhoneId": draw(maybe(IDS)),
            "phoneJid": draw(maybe(JIDS)),
            "at": draw(maybe(TIMES)),
            "traceparent": draw(maybe(TRACEPARENTS)),
        }
        if kind == "connection.update":
            fields |= {
                "connection": draw(maybe(st.sampled_from(["open", "close", "connecting", "opened", None]))),
                "statusCode": draw(maybe(st.sampled_from([401, 515, 99, 600, True, None, "401"]))),
                "isNewLogin": draw(maybe(st.sampled_from([True, False, None, 0]))),
            }
        elif kind == "decrypt.error":
            fields |= {
                "error": draw(maybe(TEXTS)),
                "source": draw(maybe(st.sampled_from(["message", "app-state", "media", "other", None]))),
                "peerJid": draw(maybe(JIDS)),
                "messageType": draw(maybe(st.sampled_from(["pkmsg", "msg", "skmsg", "x", None]))),
                "collection": draw(maybe(st.sampled_from(["regular_high", "Regular", "", None, 3]))),
            }
        elif kind == "activity":
            fields |= {
                "lastInboundAt": draw(maybe(TIMES)),
                "messages": draw(maybe(st.sampled_from([0, 12, -1, 10**9 + 1, True, None, 1.5]))),
            }
    if draw(st.booleans()):
        fields["unknownField"] = draw(st.sampled_from([1, "x", [1, 2], {"a": None}]))
    if kind is None:
        del fields["type"]
    return {key: value for key, value in fields.items() if value is not MISSING}


frames = st.one_of(events(), st.lists(events(), max_size=4), st.sampled_from([[], 5, "x", None]))


def reader(text: str) -> Any:
    try:
        return parse_text(text)
    except FrameInvalid as invalid:
        return ("invalid", invalid.error, invalid.details, invalid.reason)


def serialize(frame: Any) -> str | None:
    try:
        return json.dumps(frame, allow_nan=False)
    except ValueError:
        return None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=frames)
def test_the_fast_path_accepts_only_what_the_reader_accepts_with_the_same_result(frame: Any) -> None:
    text = serialize(frame)
    if text is None:
        return
    expected = reader(text)
    fast = decode_fast(text)
    if fast is not None:
        assert fast == expected, "accepted by both, with the same messages"
        assert decode_fast(text.encode()) == expected, "bytes decode the same"
    try:
        result: Any = parse_frame(text)
    except FrameInvalid as invalid:
        result = ("invalid", invalid.error, invalid.details, invalid.reason)
    assert result == expected, "the same messages, or the same errors with the same details"


@settings(max_examples=300, deadline=None)
@given(
    frame=st.lists(
        st.fixed_dictionaries(
            {
                "type": st.just("decrypt.error"),
                "organizationId": st.integers(1, 2**31 - 1),
                "organizationPhoneId": st.integers(1, 2**31 - 1),
                "phoneJid": st.just("79001112233@s.whatsapp.net"),
                "error": st.text(min_size=1, max_size=50).filter(lambda s: s.strip() and not UNSURE.search(s)),
            },
            optional={
                "source": st.sampled_from(["message", "app-state", "media"]),
                "at": st.just("2026-11-25T03:52:37Z"),
            },
        ),
        min_size=1,
        max_size=20,
    )
)
def test_valid_frames_take_the_fast_path(frame: list[dict[str, Any]]) -> None:
    text = json.dumps(frame)
    fast = decode_fast(text)
    assert fast is not None and fast == parse_text(text), text


def test_an_unknown_key_and_a_long_integer_anywhere_are_left_to_the_reader() -> None:
    text = json.dumps({"type": "decrypt.error", "organizationId": 1, "organizationPhoneId": 2,
                       "phoneJid": "79001112233@s.whatsapp.net", "error": "Bad MAC", "extra": 10**30})  # fmt: skip
    assert decode_fast(text) is None
    unknown = json.dumps(json.loads(text) | {"extra": "a runtime's own field"})
    assert decode_fast(unknown) is None and parse_frame(unknown) == parse_text(unknown)
    try:
        parse_frame(text)
    except FrameInvalid as invalid:
        assert "integer" in invalid.error
    else:
        raise AssertionError("the reader refuses it")


def test_the_openapi_document_names_the_structs_fields() -> None:
    schemas = json.loads(OPENAPI_PATH.read_text())["components"]["schemas"]
    for name, struct in (("ConnectionUpdate", WireConnectionUpdate), ("DecryptError", WireDecryptError),
                         ("Activity", WireActivity), ("CommandAck", WireCommandAck)):  # fmt: skip
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        fields = {field.encode_name: field for field in info.fields}
        schema = schemas[name]
        assert set(schema["properties"]) == {"type", *fields}, name
        assert set(schema["required"]) == {"type", *(n for n, f in fields.items() if f.required)}, name
        assert schema["properties"]["type"]["const"] == info.tag, name
        hints = typing.get_type_hints(struct, include_extras=True)
        for field in info.fields:
            literal = [a for a in typing.get_args(hints[field.name]) if typing.get_origin(a) is typing.Literal]
            hint = hints[field.name]
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
            values = set(choices) or {v for a in literal for v in typing.get_args(a)}
            if values:
                prop = schema["properties"][field.encode_name]
                enums = [option["enum"] for option in prop.get("anyOf", [prop]) if "enum" in option]
                assert [set(enum) for enum in enums] == [values], (name, field.name)
