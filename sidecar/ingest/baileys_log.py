"""Reads a Baileys backend's log: pino JSON lines and libsignal's multi-line console output, into runtime link
v1 events (the same dicts a runtime would send, validated the same way). Pure: no I/O, no clock. Over 300
lines: the pino and libsignal readers share the per-message dedup state and are tested as one reader.

What becomes an event:
- `failed to decrypt message` (Baileys, level 50): a decrypt error with `err.message`, the sender as peer and the
  message type; once per message id (Baileys retries a failed message and logs it again). With `message_ids`
  (`ingest-logs --message-ids`, for a log at debug level) it carries the message key id as `messageId`, and
  Baileys' later `sending receipt for messages` (level 20: the receipt of a message it decrypted) naming the same
  id becomes `message.recovered` (via `retry`). At info level nothing shows a recovery, so every failure would
  look lost: the ids are left out unless asked for, and loss is not measured on that path.
- app-state sync failures: `failed to sync state from version…` (6.x, info level, OpenSSL's bad decrypt in the
  stack), `failed to decode patch, skipping` (7.x, `Invalid patch mac`), and 7.x's LTHash, missing-key, retry
  and give-up messages (rules/app_state.py says what each means); one failure that logs twice (6.x: retry, then
  give up) counts once per collection and kind within APP_STATE_REPEAT_SECONDS.
- connections: Baileys' `opened connection to WA` and `connection errored` (a known Boom message gives the
  status code), and an app's own logged `connection.update` events (`event`, `update.connection`).
- restrictions: the reach-out time lock, message capping and refused messages (463, 479) as `account.restriction`
  (ingest/baileys_restrictions.py says which lines).
- libsignal's console block (`Session error:<Type>: <message>`) names the real cause behind Baileys'
  `No matching sessions found for message` on the msg path: a Bad MAC, or only a duplicate (`Key used already or
  never filled`). The next such record takes that cause, so redeliveries are not counted as Bad MAC.

Session identity comes from pino bindings (`organizationId`, `organizationPhoneId`, `phoneJid`), or from a mapping
of one binding's value to those ids (SessionMap).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sidecar.events.reader import COLLECTION
from sidecar.ingest import baileys_restrictions
from sidecar.rules.app_state import WRAPPER_MESSAGES, app_state_signal, error_signal
from sidecar.rules.jid import InvalidJid, parse_jid

# Most lines of a busy backend are none of these: a chunk of the log is searched for them (str.find runs in C)
# and only the lines that hold one are parsed; the rest are only counted.
NEEDLES = (
    "failed to decrypt message",
    "failed to sync ",
    "failed to decode patch",
    "LTHash verification failed",
    "blocked on missing key",
    "opened connection to WA",
    "connection errored",
    "connection.update",
    "Session error:",
    "pairing configured successfully",
    *baileys_restrictions.NEEDLES,
)
SESSION_ERROR = re.compile(r"^Session error:(?P<type>\w+): (?P<message>.*?)(?: (?P=type): (?P=message))?\s*$")
NO_MATCHING_SESSIONS = "No matching sessions found for message"
APP_STATE_REPEAT_SECONDS = 10.0
LIBSIGNAL_CAUSE_LINES = 50  # a console block explains a Baileys record at most this many lines later
SEEN_MESSAGES = 10_000
RECEIPT = "sending receipt for messages"  # Baileys, debug level: the receipt of messages it decrypted
MAX_MESSAGE_ID = 128
# Baileys' Boom messages whose status code is fixed (a <failure reason=…> says only "Connection Failure").
CLOSE_CODES = {
    "Stream Errored (restart required)": 515,
    "Connection Terminated": 428,
    "Connection Closed": 428,
    "Stream Errored (conflict)": 440,
    "Timed Out": 408,
    "Connection was lost": 408,
    "Intentional Logout": 401,
}


@dataclass(frozen=True, slots=True)
class SessionIds:
    organization_id: int
    organization_phone_id: int
    phone_jid: str


@dataclass(frozen=True)
class SessionMap:
    """Names sessions when the log carries no ids: `field`'s value (e.g. a `sessionId` binding) -> ids."""

    field: str
    sessions: dict[str, SessionIds]

    @classmethod
    def from_document(cls, document: object) -> SessionMap:
        """From {"field": "...", "sessions": {"<value>": {organizationId, organizationPhoneId, phoneJid}}}."""
        if not isinstance(document, dict) or not isinstance(document.get("field"), str) or not document["field"]:
            raise ValueError("field: must name the binding that identifies a session")
        entries = document.get("sessions")
        if not isinstance(entries, dict) or not entries:
            raise ValueError("sessions: must map binding values to {organizationId, organizationPhoneId, phoneJid}")
        sessions = {}
        for value, entry in entries.items():
            ids = _ids(entry) if isinstance(entry, dict) else None
            if ids is None:
                raise ValueError(
                    f"sessions.{value}: needs organizationId and organizationPhoneId (positive integers) "
                    "and phoneJid (a user JID)"
                )
            sessions[str(value)] = ids
        return cls(document["field"], sessions)


# The bindings that name a session (the pino child logger's, as the docs show), each also read in snake case.
BINDINGS = (("organizationId", "organization_id"), ("organizationPhoneId", "organization_phone_id"),
            ("phoneJid", "phone_jid"))  # fmt: skip


def _binding(record: dict[str, Any], names: tuple[str, str]) -> object:
    return record.get(names[0], record.get(names[1]))


def _ids(record: dict[str, Any]) -> SessionIds | None:
    organization, phone, jid = (_binding(record, names) for names in BINDINGS)
    if isinstance(organization, str) and organization.isdigit():
        organization = int(organization)
    if isinstance(phone, str) and phone.isdigit():
        phone = int(phone)
    if not (isinstance(organization, int) and organization > 0 and isinstance(phone, int) and phone > 0):
        return None
    if not isinstance(jid, str) or not _is_user_jid(jid):
        return None
    return SessionIds(organization, phone, jid)


def _message_id(value: object) -> bool:
    """A key id the schema takes as a messageId: 1 to 128 printable ASCII characters without spaces."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_MESSAGE_ID
        and value.isascii()
        and value.isprintable()
        and (" " not in value)
    )


def _is_user_jid(text: str) -> bool:
    try:
        parse_jid(text)
    except InvalidJid:
        return False
    return True


def _timestamp(value: object) -> tuple[str | None, float | None]:
    """pino's `time`: epoch milliseconds (the default) or an ISO string (Baileys' own logger)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value / 1000, UTC)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None, None
        if moment.tzinfo is None:
            return None, None
    else:
        return None, None
    return moment.isoformat().replace("+00:00", "Z"), moment.timestamp()


def _close_code(record: dict[str, Any], update: dict[str, Any]) -> int | None:
    """A Boom's status code: `output.statusCode` on the live object; logged, it is often flattened."""
    error = (update.get("lastDisconnect") or {}).get("error")
    candidates: list[object] = []
    if isinstance(error, dict):
        output, payload = error.get("output"), error.get("payload")
        candidates += [
            output.get("statusCode") if isinstance(output, dict) else None,
            error.get("statusCode"),
            payload.get("statusCode") if isinstance(payload, dict) else None,
        ]
    candidates.append(record.get("statusCode"))
    return next((c for c in candidates if isinstance(c, int) and not isinstance(c, bool)), None)


@dataclass
class ReadStats:
    lines: int = 0
    parsed: int = 0
    events: int = 0
    unattributed: int = 0
    duplicates: int = 0
    libsignal_blocks: int = 0
    causes_applied: int = 0


@dataclass
class BaileysLogReader:
    session_map: SessionMap | None = None
    stats: ReadStats = field(default_factory=ReadStats)
    message_ids: bool = False  # the log is at debug level: failures carry messageId, receipts recover them
    _seen: OrderedDict[tuple[int, str], None] = field(default_factory=OrderedDict)
    _failed: OrderedDict[tuple[int, str], None] = field(default_factory=OrderedDict)  # (phone, id) failed here
    _app_state: dict[tuple[int, str, str], float] = field(default_factory=dict)
    _cause: str | None = None
    _cause_age: int = 0
    # Phones paired anew (a QR shown or a pairing completed): their next `open` is a new login.
    _paired: set[int] = field(default_factory=set)
    # Why the first line that meant an event named no session (the bindings it lacked), once; the command says it.
    unattributed_hint: str | None = None

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Whole lines of the log (one or many); returns the events they mean, in order."""
        starts: set[int] = set()
        for needle in (*NEEDLES, RECEIPT) if self.message_ids else NEEDLES:
            found = text.find(needle)
            while found >= 0:
                starts.add(text.rfind("\n", 0, found) + 1)
                line_end = text.find("\n", found)
                found = text.find(needle, line_end) if line_end >= 0 else -1
        events: list[dict[str, Any]] = []
        position = 0
        for start in sorted(starts):
            self._skip(text.count("\n", position, start))
            end = text.find("\n", start)
            position = end + 1 if end >= 0 else len(text)
            self._skip(1)
            event = self._line(text[start:position])
            if isinstance(event, list):
                events += event
                self.stats.events += len(event) - 1
            elif event is not None:
                events.append(event)
        self._skip(text.count("\n", position) + (1 if position < len(text) and not text.endswith("\n") else 0))
        return events

    def _skip(self, lines: int) -> None:
        """Lines read: counted, and they age a libsignal cause that no Baileys record has taken."""
        self.stats.lines += lines
        if self._cause is not None:
            self._cause_age += lines
            if self._cause_age > LIBSIGNAL_CAUSE_LINES:
                self._cause = None

    def _line(self, line: str) -> dict[str, Any] | list[dict[str, Any]] | None:
        text = line.strip()
        if text.startswith("Session error:"):
            self._libsignal_cause(text)
            return None
        if not text.startswith("{"):
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        self.stats.parsed += 1
        event = self._event(record)
        if event is not None:
            self.stats.events += 1
        return event

    def _libsignal_cause(self, text: str) -> None:
        match = SESSION_ERROR.match(text)
        if match is None:
            return
        self.stats.libsignal_blocks += 1
        # libsignal tries each known session of the peer and prints one block per failure; a Bad MAC among the
        # blocks of one message is the fault that matters, so a recent Bad MAC is not replaced by a lesser cause.
        recent_bad_mac = self._cause is not None and "Bad MAC" in self._cause and self._cause_age <= 10
        if not recent_bad_mac:
            self._cause = match.group("message")
        self._cause_age = 0

    def _missing(self, record: dict[str, Any]) -> str:
        """What a line that names no session lacks, in words an operator can act on."""
        if self.session_map is not None:
            value = record.get(self.session_map.field)
            if value is None:
                return f"no `{self.session_map.field}` binding (the --sessions file's field)"
            return f"its `{self.session_map.field}` value is not in the --sessions file"  # the value: maybe a number
        missing = [names[0] for names in BINDINGS if _binding(record, names) is None]
        if missing:
            return "no " + ", ".join(f"`{name}`" for name in missing) + " binding" + ("s" if len(missing) > 1 else "")
        return "the bindings are there but not valid (positive integer ids and a user jid)"

    def _session(self, record: dict[str, Any]) -> SessionIds | None:
        if self.session_map is not None:
            value = record.get(self.session_map.field)
            if value is not None:
                return self.session_map.sessions.get(str(value))
        return _ids(record)

    def _event(self, record: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]] | None:
        message = record.get("msg")
        if message == "failed to decrypt message":
            return self._decrypt_failure(record)
        if message == RECEIPT and self.message_ids:
            return self._recoveries(record)
        if isinstance(message, str) and message.startswith(WRAPPER_MESSAGES):
            return self._app_state_failure(record)
        if isinstance(message, str) and (signal := app_state_signal(message)) is not None:
            return self._app_state_failure(record, message, str(signal.kind))  # 7.x: the message is the signal
        if isinstance(message, str) and message.startswith("pairing configured successfully"):
            self._pair(record)
            return None
        if message == "opened connection to WA":
            return self._connection(record, "open", None)
        if message == "connection errored":
            trace = str(record.get("trace") or record.get("err") or "")
            boom = trace.split("\n", 1)[0].removeprefix("Error: ")
            return self._connection(record, "close", CLOSE_CODES.get(boom))
        if (restriction := baileys_restrictions.restriction_fields(record)) is not None:
            event = self._base(record, "account.restriction")
            return None if event is None else event | restriction
        update = record.get("update")
        if record.get("event") == "connection.update" and isinstance(update, dict):
            if update.get("isNewLogin") or update.get("qr"):
                self._pair(record)
            connection = update.get("connection")
            if connection not in ("connecting", "open", "close"):
                return None
            return self._connection(record, str(connection), _close_code(record, update))
        return None

    def _base(self, record: dict[str, Any], kind: str) -> dict[str, Any] | None:
        ids = self._session(record)
        if ids is None:
            self.stats.unattributed += 1
            if self.stats.unattributed == 1:
                self.unattributed_hint = self._missing(record)
            return None
        event: dict[str, Any] = {
            "type": kind,
            "organizationId": ids.organization_id,
            "organizationPhoneId": ids.organization_phone_id,
            "phoneJid": ids.phone_jid,
        }
        at, _ = _timestamp(record.get("time"))
        if at is not None:
            event["at"] = at
        return event

    def _pair(self, record: dict[str, Any]) -> None:
        ids = self._session(record)
        if ids is not None:
            self._paired.add(ids.organization_phone_id)

    def _connection(self, record: dict[str, Any], connection: str, code: int | None) -> dict[str, Any] | None:
        event = self._base(record, "connection.update")
        if event is not None:
            event["connection"] = connection
            if code is not None and 100 <= code <= 599:
                event["statusCode"] = code
            if connection == "open" and event["organizationPhoneId"] in self._paired:
                self._paired.discard(event["organizationPhoneId"])
                event["isNewLogin"] = True
        return event

    def _decrypt_failure(self, record: dict[str, Any]) -> dict[str, Any] | None:
        error = record.get("err")
        text = error.get("message") if isinstance(error, dict) else error
        if not isinstance(text, str) or not text:
            return None
        cause, self._cause = self._cause, None
        if text == NO_MATCHING_SESSIONS and cause is not None:
            text = cause
            self.stats.causes_applied += 1
        event = self._base(record, "decrypt.error")
        if event is None:
            return None
        raw_key = record.get("key")
        key: dict[str, Any] = raw_key if isinstance(raw_key, dict) else {}
        message_id = key.get("id")
        if isinstance(message_id, str):
            seen = (event["organizationPhoneId"], f"{key.get('remoteJid')}/{message_id}")
            if seen in self._seen:
                self.stats.duplicates += 1
                return None
            self._seen[seen] = None
            if len(self._seen) > SEEN_MESSAGES:
                self._seen.popitem(last=False)
        event["error"] = text
        event["source"] = "message"
        if self.message_ids and _message_id(message_id):
            assert isinstance(message_id, str)
            event["messageId"] = message_id
            self._failed[event["organizationPhoneId"], message_id] = None
            if len(self._failed) > SEEN_MESSAGES:
                self._failed.popitem(last=False)
        peer = key.get("participant") or key.get("remoteJid")
        if isinstance(peer, str) and _is_user_jid(peer):
            event["peerJid"] = peer
        if record.get("messageType") in ("pkmsg", "msg", "skmsg"):
            event["messageType"] = record["messageType"]
        return event

    def _recoveries(self, record: dict[str, Any]) -> list[dict[str, Any]] | None:
        """A receipt of messages Baileys decrypted: each id that failed here before was recovered (re-sent after the
        retry receipt). The retry receipts themselves are logged as `sent retry receipt`, not here."""
        attrs = record.get("attrs")
        if isinstance(attrs, dict) and attrs.get("type") == "retry":
            return None
        ids = record.get("messageIds")
        if not isinstance(ids, list):
            return None
        ids_of = self._session(record)
        if ids_of is None:
            return None
        recovered = []
        for message_id in ids:
            key = (ids_of.organization_phone_id, message_id)
            if isinstance(message_id, str) and key in self._failed:
                del self._failed[key]
                event = self._base(record, "message.recovered")
                if event is not None:
                    recovered.append(event | {"messageId": message_id, "via": "retry"})
        return recovered or None

    def _app_state_failure(
        self, record: dict[str, Any], text: str | None = None, kind: str = "decrypt"
    ) -> dict[str, Any] | None:
        if text is None:
            error = record.get("error", record.get("err"))
            if isinstance(error, dict):
                error = error.get("stack") or error.get("message")
            if not isinstance(error, str) or error_signal(error) is None:
                return None
            text = error.split("\n", 1)[0]
        event = self._base(record, "decrypt.error")
        if event is None:
            return None
        _, moment = _timestamp(record.get("time"))
        name = record.get("name")
        repeat = (event["organizationPhoneId"], str(name or ""), kind)
        last = self._app_state.get(repeat)
        if moment is not None and last is not None and moment - last < APP_STATE_REPEAT_SECONDS:
            self.stats.duplicates += 1
            return None
        if moment is not None:
            self._app_state[repeat] = moment
        event["error"] = text
        event["source"] = "app-state"
        if isinstance(name, str) and COLLECTION.match(name):
            event["collection"] = name
        return event
