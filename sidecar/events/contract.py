"""What the schema's structs look like from outside: JSON Schema (the Baileys adapter's tests validate its frames
against it), the OpenAPI components of `POST /v1/events`, and the rows of the protocol reference page. Derived
from events/schema.py; docs/generate.py writes the files and checks them for drift.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import msgspec

from sidecar.events.schema import (
    COMMANDS,
    INBOUND,
    MAX_EVENTS_PER_FRAME,
    EventsAck,
    InboundMessage,
    LinkError,
    OutboundCommand,
    Timestamp,
    wire_name,
)


def _schema_hook(kind: type) -> dict[str, Any]:
    if kind is Timestamp:
        return {"type": "string", "format": "date-time"}
    raise NotImplementedError(kind)


def encode_hook(value: object) -> object:
    """msgspec's `enc_hook`: a Timestamp travels as RFC 3339, like any datetime (UTC as `Z`)."""
    if isinstance(value, datetime):
        return msgspec.to_builtins(datetime.combine(value.date(), value.timetz()))
    raise NotImplementedError(type(value))


def _components(ref_template: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    (inbound, outbound), components = msgspec.json.schema_components(
        [InboundMessage, OutboundCommand | LinkError | EventsAck], schema_hook=_schema_hook, ref_template=ref_template
    )
    for schema in components.values():
        tag = schema.get("properties", {}).get("type", {})
        if list(tag) == ["enum"] and len(tag["enum"]) == 1:
            schema["properties"]["type"] = {"const": tag["enum"][0]}
        schema.pop("title", None)
    return inbound, outbound, components


def json_schema() -> dict[str, Any]:
    """One frame a runtime sends (an event or an array of them) and what the sidecar sends back, as JSON Schema
    2020-12. Strict about keys: an adapter that sends a key of its own is told so by its tests."""
    inbound, outbound, components = _components("#/$defs/{name}")
    frame = {
        "anyOf": [
            {"$ref": "#/$defs/Message"},
            {"type": "array", "items": {"$ref": "#/$defs/Message"}, "minItems": 1, "maxItems": MAX_EVENTS_PER_FRAME},
        ]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "runtime-link-v1.schema.json",
        "title": "whatsapp-session-sidecar runtime link v1",
        "description": "Generated from sidecar/events/schema.py by `python -m docs.generate`; do not edit by hand.",
        "$defs": components
        | {
            "Message": inbound,
            "Frame": frame,
            "SidecarMessage": outbound,
        },
        "$ref": "#/$defs/Frame",
    }


def openapi_components() -> dict[str, Any]:
    """The components `POST /v1/events` names (`Event` and each message). Unknown keys are ignored there."""
    inbound, _, components = _components("#/components/schemas/{name}")
    wanted = {kind.__name__ for kind in INBOUND} | set(_referenced(components, INBOUND))
    selected = {name: schema for name, schema in components.items() if name in wanted}
    for schema in selected.values():
        schema.pop("additionalProperties", None)
    return selected | {"Event": inbound}


def _referenced(components: dict[str, Any], kinds: tuple[type, ...]) -> Iterator[str]:
    prefix = "#/components/schemas/"
    for kind in kinds:
        text = json.dumps(components[kind.__name__])
        for part in text.split(prefix)[1:]:
            yield part.split('"', 1)[0]


def field_rows(kind: type[msgspec.Struct]) -> list[tuple[str, str, str, str]]:
    """(key, type, required or default, meaning) for each field of a message, as the reference page lists them."""
    _, _, components = _components("#/$defs/{name}")
    schema = components[kind.__name__]
    required = set(schema.get("required", ()))
    rows = []
    for key, prop in schema["properties"].items():
        if key == "type":
            continue
        options = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
        shown = " or ".join(_type_text(components.get(_ref(option), option)) for option in options)
        default = "required" if key in required else f"optional (default {json.dumps(prop.get('default'))})"
        meaning = " ".join(o.get("description", "") for o in options if o.get("description")) or prop.get(
            "description", ""
        )
        rows.append((key, shown, default, meaning))
    return rows


def _ref(prop: dict[str, Any]) -> str:
    return str(prop.get("$ref", "")).rsplit("/", 1)[-1]


def _type_text(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return _ref(prop)
    if "enum" in prop:
        return " or ".join(f"`{value}`" for value in prop["enum"])
    text = str(prop.get("type", "any"))
    if prop.get("format"):
        text += f" ({prop['format']})"
    bounds = [f"{name} {prop[key]}" for key, name in (("minimum", "≥"), ("maximum", "≤")) if key in prop]
    bounds += [f"{name} {prop[key]}" for key, name in (("minLength", "length ≥"), ("maxLength", "length ≤"))
               if key in prop]  # fmt: skip
    if "pattern" in prop and prop["pattern"] != "\\S":
        bounds.append(f"`{prop['pattern']}`")
    if prop.get("type") == "array":
        text = f"array of {_type_text(prop.get('items', {}))}"
    return text + (f", {', '.join(bounds)}" if bounds else "")


def messages() -> list[tuple[str, str, type[msgspec.Struct]]]:
    """(direction, wire name, struct) of every message of the protocol."""
    kinds: list[tuple[str, type[msgspec.Struct]]] = [("runtime → sidecar", kind) for kind in INBOUND]
    kinds += [("sidecar → runtime", kind) for kind in (*COMMANDS, LinkError, EventsAck)]
    return [(direction, wire_name(kind), kind) for direction, kind in kinds]
