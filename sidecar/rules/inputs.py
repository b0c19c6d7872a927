"""What a valid inbound field is: the one definition that the link protocol (frames, HTTP bodies) and the
runtime's direct API (the seed's handleBadMacError and friends) both check against.

Each check returns None for a good value, or the problem in words for the caller's error (it names the field).
"""

from __future__ import annotations

import re

from sidecar.rules.jid import InvalidJid, parse_jid
from sidecar.rules.records import PhoneRef

MAX_ID = 2**31 - 1  # the seed schema's ids are PostgreSQL INTEGER
CONNECTION_STATES = ("connecting", "open", "close")
JID_PROBLEM = "must be a user JID such as 79001112233@s.whatsapp.net"


class InvalidInput(ValueError):
    """Bad input from a caller; `field` names what was wrong. Nothing was changed."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


MAX_INTEGER_DIGITS = 20  # JSON integers longer than this are refused before conversion (ids fit in 10)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """PostgreSQL text cannot hold NUL, and UTF-8 cannot hold a lone surrogate: refuse them up front."""
    if _UNSTORABLE.search(value):
        return "must not contain NUL characters or unpaired surrogates"
    return None


class IntegerTooLong(ValueError):
    pass


def bounded_int(text: str) -> int:
    """`json.loads(..., parse_int=bounded_int)`: a huge integer is bad input, not a 4,300-digit conversion error."""
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise IntegerTooLong(f"an integer of {len(text)} digits (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def ascii_id(raw: str, maximum: int = MAX_ID) -> int | None:
    """A path or query number: ASCII digits only ('²' and Arabic-Indic digits pass str.isdigit), bounded."""
    if not raw or len(raw) > 10 or not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if 1 <= value <= maximum else None


def id_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        return f"must be a positive integer up to {MAX_ID}"
    return None


def connection_problem(value: object) -> str | None:
    if value not in CONNECTION_STATES:
        return f"must be one of {', '.join(CONNECTION_STATES)}"
    return None


def user_of_jid(text: str) -> str:
    """The bare number of a user JID; raises InvalidJid (its message says what is wrong)."""
    return parse_jid(text).bare


def phone_ref(organization_id: int, organization_phone_id: int, phone_jid: str) -> PhoneRef:
    """The phone an event of the runtime's direct API names; raises InvalidInput for the first bad field."""
    # The hot path of every event: plain type checks first, the problem text only for a bad value.
    if not (type(organization_id) is int and type(organization_phone_id) is int) or not (
        0 < organization_id <= MAX_ID and 0 < organization_phone_id <= MAX_ID
    ):
        for name, value in (("organizationId", organization_id), ("organizationPhoneId", organization_phone_id)):
            if id_problem(value) is not None:
                raise InvalidInput(name, "must be a positive integer")
    try:
        user = parse_jid(phone_jid).bare
    except InvalidJid as error:
        raise InvalidInput("phoneJid", str(error)) from None
    return PhoneRef(organization_id, organization_phone_id, user)


def peer_user(peer_jid: str | None) -> str | None:
    """The failing peer's bare number (None when not named); raises InvalidInput for a malformed JID."""
    if not peer_jid:
        return None
    try:
        return user_of_jid(peer_jid)
    except InvalidJid as error:
        raise InvalidInput("peerJid", str(error)) from None


def checked_connection(connection: str) -> str:
    if (problem := connection_problem(connection)) is not None:
        raise InvalidInput("connection", f"{problem}, got {connection!r}")
    return connection
