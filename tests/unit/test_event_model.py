"""The one event model: what is derived from sidecar/events/schema.py agrees with it, read by tools of their own.
The SDK's builders produce frames that the generated JSON Schema accepts (checked by the `jsonschema` package,
not by our decoder), that schema refuses what the structs refuse, and our decoder takes the same frames back."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from sidecar.client import activity, connection_update, decrypt_error
from sidecar.events.decode import decode_fast
from sidecar.events.schema import Activity, ConnectionUpdate, DecryptError

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "integrations" / "baileys" / "runtime-link.schema.json").read_text())
JID = "79001112233@s.whatsapp.net"


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def sdk_frames() -> list[dict[str, object]]:
    return [
        connection_update(7, 42, JID, "open", new_login=True),
        connection_update(7, 42, JID, "close", 428),
        decrypt_error(7, 42, JID, "Bad MAC", source="message", peer_jid="15550002222@lid", message_type="pkmsg"),
        decrypt_error(7, 42, JID, "Invalid patch mac", source="app-state", collection="regular_high"),
        activity(7, 42, JID, datetime(2026, 12, 1, 9, 30, tzinfo=UTC), messages=3, receipts=1),
    ]


def test_the_sdk_builds_frames_the_generated_schema_accepts_and_the_decoder_reads_back() -> None:
    frames = sdk_frames()
    assert sorted(error.message for error in validator().iter_errors(frames)) == []
    decoded = decode_fast(json.dumps(frames))
    assert decoded is not None, "the fast path vouches for every SDK frame"
    assert [type(event) for event in decoded] == [ConnectionUpdate, ConnectionUpdate, DecryptError, DecryptError,
                                                  Activity]  # fmt: skip
    assert isinstance(decoded[2], DecryptError) and decoded[2].peer_jid == "15550002222@lid"
    assert isinstance(decoded[4], Activity) and decoded[4].last_inbound_at == datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"organizationPhoneId": 0}, "ids start at 1"),
        ({"organizationPhoneId": 2**31}, "ids are PostgreSQL INTEGER"),
        ({"phoneJid": "12345@g.us"}, "a group is not a session"),
        ({"messageType": "text"}, "not a Signal message type"),
        ({"collection": "Regular"}, "collections are lowercase"),
        ({"error": ""}, "the error text is required"),
        ({"type": "decrypt.errors"}, "unknown type"),
        ({"mine": 1}, "the adapter's schema is strict about keys"),
    ],
)
def test_the_generated_schema_refuses_what_the_contract_refuses(change: dict[str, object], why: str) -> None:
    frame = decrypt_error(7, 42, JID, "Bad MAC", source="message") | change
    assert list(validator().iter_errors(frame)), why
