"""Runtime link protocol v1, defined once: every event a runtime sends and every command the sidecar sends back,
as msgspec structs with their wire names (camelCase), tags and constraints.

Everything else is derived from these structs: decoding (events/decode.py, with the hand-written reader in
events/reader.py as its oracle), the Python SDK's builders (sidecar/client.py), the OpenAPI components and
`docs/reference/runtime-link.md` (docs/generate.py), and the JSON Schema the Baileys adapter's tests validate its
frames against (integrations/baileys/runtime-link.schema.json). A new optional field is one line here.

A frame (or an HTTP body) holds one JSON object or a JSON array of them. Unknown keys are ignored by the reader,
so runtimes can add fields of their own without breaking older sidecars (the fast path hands such frames over).
Constraints that JSON Schema can state but msgspec should not run per event (a JID's pattern, a non-blank text:
the decoder checks those in Python and remembers the good ones) are given to the schema only (`extra_json_schema`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal, TypedDict

import msgspec

from sidecar.rules.classification import ErrorSource
from sidecar.rules.inputs import MAX_ID
from sidecar.rules.jid import USER_JID_PATTERN
from sidecar.rules.restrictions import RestrictionKind

MAX_EVENTS_PER_FRAME: Final = 10_000
MAX_ERROR_TEXT: Final = 16_384
MAX_COUNT: Final = 1_000_000_000
MAX_TEXT: Final = 256  # any other string field
MAX_TIMESTAMP: Final = 64
COLLECTION_PATTERN: Final = r"^[a-z_]{1,64}$"
TRACEPARENT_PATTERN: Final = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
NON_BLANK: Final = r"\S"
MESSAGE_TYPES: Final = ("pkmsg", "msg", "skmsg")
MAX_DETAIL: Final = 1_024


class Timestamp(datetime):
    """An RFC 3339 timestamp with a time zone. Decoded by the reader's own parser (events/reader.py: the
    decoder's `dec_hook`), so both paths accept exactly the same texts; encoded as any datetime."""


Id = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
# `extra` tells the reader (events/reader.py) what msgspec's types cannot: a check of its own (a JID), a problem's
# wording, a string taken as it comes.
Jid = Annotated[
    str,
    msgspec.Meta(
        extra_json_schema={"pattern": USER_JID_PATTERN, "examples": ["79001112233@s.whatsapp.net"]},
        extra={"check": "jid"},
    ),
]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT, extra_json_schema={"pattern": NON_BLANK})]
Traceparent = Annotated[
    str,
    msgspec.Meta(
        pattern=TRACEPARENT_PATTERN,
        max_length=55,
        description="W3C trace context; the sidecar's spans join this trace.",
        extra={"problem": "must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"},
    ),
]
At = Annotated[Timestamp, msgspec.Meta(description="when the runtime saw it")]
MAX_SEQ: Final = 2**53 - 1  # exact in every JSON implementation
RUNTIME_ID_PATTERN: Final = r"^[\x20-\x7e]*[\x21-\x7e][\x20-\x7e]*$"  # printable ASCII, not blank
Seq = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=MAX_SEQ,
        description="the event's sequence number for its runtime id (increasing): the sidecar answers "
        "`events.ack` once everything up to it is durable, and ignores an event it has already taken",
    ),
]


class Inbound(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    tag_field="type",
    rename="camel",
    omit_defaults=True,
    forbid_unknown_fields=True,  # the fast path hands a frame with keys of a runtime's own to the reader
):
    """What every runtime -> sidecar message shares: its `type` tag, camelCase keys."""


class Event(Inbound, frozen=True, kw_only=True):
    """What every session event carries: the session (organizationPhoneId) and where it belongs."""

    organization_id: Annotated[Id, msgspec.Meta(description="the organization that owns the number")]
    organization_phone_id: Annotated[Id, msgspec.Meta(description="the session (one WhatsApp number)")]
    phone_jid: Annotated[Jid, msgspec.Meta(description="the session's own JID")]
    at: At | None = None
    traceparent: Traceparent | None = None
    seq: Seq | None = None


class ConnectionUpdate(Event, frozen=True, kw_only=True, tag="connection.update"):
    """The socket's connection state: `open` resets both counters; `close` with some status codes closes."""

    connection: Literal["connecting", "open", "close"]
    status_code: (
        Annotated[
            int,
            msgspec.Meta(
                ge=100, le=599,
                description="Baileys DisconnectReason on close (401 loggedOut, 403, 411 close the session by default)",
            ),
        ]
        | None
    ) = None  # fmt: skip
    # The runtime paired this phone anew (QR scan) since it last closed: an open after a sidecar logout is then a
    # real re-login, not a logout that failed to stick.
    new_login: Annotated[
        bool,
        msgspec.Meta(
            description="the runtime paired this phone anew (QR scan) since it last closed; an open after a "
            "sidecar logout without it is a reconnected_after_logout incident and is ended again"
        ),
    ] = msgspec.field(default=False, name="isNewLogin")


MESSAGE_ID_PATTERN: Final = r"^[\x21-\x7e]{1,128}$"  # printable ASCII, no spaces
# The pattern is the schema's and the reader's; the fast decoder checks it in Python (events/decode.py: one id per
# failed message, each new, and `str` methods cost a fraction of msgspec's call into `re`).
MessageId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        extra_json_schema={"pattern": MESSAGE_ID_PATTERN},
        extra={"problem": "must be 1 to 128 printable ASCII characters without spaces", "pattern": MESSAGE_ID_PATTERN},
    ),
]
RecoveryPath = Literal["retry", "placeholder", "other"]


class DecryptError(Event, frozen=True, kw_only=True, tag="decrypt.error"):
    """A decryption failure, raw: the sidecar classifies the text (Bad MAC, bad decrypt, ...)."""

    error: Annotated[
        str,
        msgspec.Meta(
            min_length=1, max_length=MAX_ERROR_TEXT, extra_json_schema={"pattern": NON_BLANK},
            description="raw error text (message or stack); classified by the sidecar",
        ),
    ]  # fmt: skip
    source: Annotated[ErrorSource, msgspec.Meta(description="where the failure happened")] | None = None
    peer_jid: Annotated[Jid, msgspec.Meta(description="the failing peer (a Bad MAC heals its session)")] | None = None
    message_type: Literal["pkmsg", "msg", "skmsg"] | None = None
    collection: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=COLLECTION_PATTERN,
                max_length=64,
                description="app-state collection (Baileys' patch name: regular_high, ...), for source app-state; "
                "labels whatsapp_app_state_sync_failures_total",
                extra={"problem": "must be an app-state collection name (lowercase letters and _)"},
            ),
        ]
        | None
    ) = None
    message_id: (
        Annotated[
            MessageId,
            msgspec.Meta(
                description="the failed message's key id (Baileys: the CIPHERTEXT stub's key.id): a later "
                "`message.recovered` with it means the message was not lost (whatsapp_messages_lost_total)"
            ),
        ]
        | None
    ) = None


class MessageRecovered(Event, frozen=True, kw_only=True, tag="message.recovered"):
    """A message that failed to decrypt (a `decrypt.error` with its `messageId`) arrived after all: re-sent after a
    retry receipt, or answered by the phone's placeholder resend. Only what nothing recovers is loss."""

    message_id: Annotated[MessageId, msgspec.Meta(description="the message key id the failure named")]
    via: Annotated[RecoveryPath, msgspec.Meta(description="how it came back")]


class Activity(Event, frozen=True, kw_only=True, tag="activity"):
    """Inbound traffic since the runtime's last report, sent (for example every 30 s) only for sessions that had
    any; the liveness watch's baseline (deaf sessions). After a reconnect of the link, a runtime reports each of
    its open sessions once (counts 0): the connection, and in fleet mode the replica it reached, then owns it."""

    messages: Annotated[Count, msgspec.Meta(description="inbound messages since the last report")] = 0
    receipts: Count = 0
    notifications: Count = 0
    last_inbound_at: (
        Annotated[
            Timestamp,
            msgspec.Meta(
                description="time of the last inbound stanza; omitted when the session had none since the runtime "
                "attached to it (a report that only says the session is on this connection)"
            ),
        ]
        | None
    ) = None


class AccountRestriction(Event, frozen=True, kw_only=True, tag="account.restriction"):
    """Something WhatsApp does to the number: a time lock on new chats, a message cap, refused messages (463,
    479), a ban, a refused client. `active: false` lifts it; a time lock with `until` ends by itself. Recorded on
    the number's timeline and told to its team; never a reason to log out or delete keys."""

    kind: Annotated[RestrictionKind, msgspec.Meta(description="what WhatsApp restricts")]
    active: Annotated[bool, msgspec.Meta(description="true while in force; false lifts it")]
    until: (
        Annotated[Timestamp, msgspec.Meta(description="when it ends by itself (a time lock's end), RFC 3339")] | None
    ) = None
    code: (
        Annotated[
            int,
            msgspec.Meta(
                ge=0, le=999_999,
                description="the number WhatsApp gave (an ack's error 463 or 479, a close's status code)",
                extra={"problem": "must be an integer from 0 to 999999"},
            ),
        ]
        | None
    ) = None  # fmt: skip
    detail: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1, max_length=MAX_DETAIL, extra_json_schema={"pattern": NON_BLANK},
                description="what the runtime was told, as text (kept on the timeline; never in metric labels)",
            ),
        ]
        | None
    ) = None  # fmt: skip


VERSION_PATTERN: Final = r"^[\x21-\x7e]{1,64}$"  # printable ASCII, no spaces
Version = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        pattern=VERSION_PATTERN,
        extra={"problem": "must be 1 to 64 printable ASCII characters without spaces"},
    ),
]


class CommandAck(Inbound, frozen=True, kw_only=True, tag="command.ack"):
    """The runtime's answer to a command; `error` starting `unsupported:` means it lacks the command."""

    command_id: Text
    ok: bool
    error: Annotated[str, msgspec.Meta(extra={"free": True})] | None = None  # any text, as the runtime gave it
    round_trip_ms: (
        Annotated[
            float,
            msgspec.Meta(
                ge=0,
                le=1e7,
                description="session.probe: the round trip with WhatsApp's server, measured by the runtime",
                extra={"problem": "must be a number of milliseconds from 0 to 10000000"},
            ),
        ]
        | None
    ) = None
    keys_deleted: (
        Annotated[
            Count,
            msgspec.Meta(
                description="auth.clear and session.end with --key-store runtime: how many auth keys the runtime "
                "deleted through its own store (creds included)",
                extra={"problem": "must be a whole number of keys from 0"},
            ),
        ]
        | None
    ) = None


class RuntimeInfo(Inbound, frozen=True, kw_only=True, tag="runtime.info"):
    """Who the runtime is, sent as the first frame of a connection. Every field is optional; without a
    `runtimeId` sequence numbers are this connection's own."""

    runtime_id: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                pattern=RUNTIME_ID_PATTERN,
                description="a stable name of this runtime process group (for example its pod name), the same "
                "across its reconnects: event sequence numbers and their acknowledgements belong to it",
                extra={"problem": "must be 1 to 128 printable ASCII characters, not blank"},
            ),
        ]
        | None
    ) = None
    library: (
        Annotated[
            Version,
            msgspec.Meta(
                description="the WhatsApp library the runtime runs, for example "
                "`baileys`; whatsapp_runtime_sessions{library,version}"
            ),
        ]
        | None
    ) = None
    library_version: (
        Annotated[
            Version,
            msgspec.Meta(
                description="the library's version as installed, for example `7.0.0-rc.12`; checked "
                "against the advisory table (sidecar/rules/advisories.json)"
            ),
        ]
        | None
    ) = None
    adapter_version: Annotated[Version, msgspec.Meta(description="the adapter's own version")] | None = None


SessionEvent = ConnectionUpdate | DecryptError | Activity | AccountRestriction | MessageRecovered
InboundMessage = (
    ConnectionUpdate | DecryptError | Activity | AccountRestriction | MessageRecovered | CommandAck | RuntimeInfo
)
INBOUND: Final = (
    ConnectionUpdate,
    DecryptError,
    Activity,
    AccountRestriction,
    MessageRecovered,
    CommandAck,
    RuntimeInfo,
)


# Sidecar -> runtime ---------------------------------------------------------------------------------------------


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", rename="camel"):
    """Sent on the connection that holds the phone; answered by one `command.ack` with the same commandId."""

    command_id: str
    organization_phone_id: Id


class SessionEnd(Command, frozen=True, kw_only=True, tag="session.end"):
    """End the socket as logged out and do not reconnect on your own (with --key-store runtime, delete every
    auth key and the creds too, and ack with `keysDeleted`)."""

    reason: str
    detail: str
    logout: bool = True


class AuthClear(Command, frozen=True, kw_only=True, tag="auth.clear"):
    """Drop cached copies of the keys with these prefixes (the store's rows are deleted already; with
    --key-store runtime the runtime deletes them from its store too and acks with `keysDeleted`)."""

    key_prefixes: list[str]


class SessionProbe(Command, frozen=True, kw_only=True, tag="session.probe"):
    """A round trip with WhatsApp's server; acked with `roundTripMs`."""


class SessionRestart(Command, frozen=True, kw_only=True, tag="session.restart"):
    """End the socket with a restartable status and reconnect as usual (deaf sessions)."""

    reason: str
    detail: str
    status_code: int


OutboundCommand = SessionEnd | AuthClear | SessionProbe | SessionRestart
COMMANDS: Final = (SessionEnd, AuthClear, SessionProbe, SessionRestart)


class Problem(TypedDict):
    """One thing wrong with a frame: the event's index, its field (camelCase) and the problem in words."""

    index: int
    field: str
    problem: str


class LinkError(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="error"):
    """The answer to a frame refused whole (nothing in it was applied); the connection stays open."""

    error: str
    details: list[Problem] = []


class EventsAck(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="events.ack", rename="camel"):
    """Every event of this runtime id (or connection) with a `seq` up to `upTo` is durable: decided (fleet mode),
    or journaled or applied (one replica). The runtime may forget them; it resends the rest after a reconnect."""

    up_to: int


def wire_name(kind: type[msgspec.Struct]) -> str:
    """The `type` a struct travels as."""
    tag = msgspec.inspect.type_info(kind).tag  # type: ignore[attr-defined]
    assert isinstance(tag, str)
    return tag
