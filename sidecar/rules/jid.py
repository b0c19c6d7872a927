"""WhatsApp JIDs: '79001112233@s.whatsapp.net', '79001112233:3@s.whatsapp.net', '205550002222777@lid'."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Users live on these servers; groups (@g.us) and broadcasts are not sessions or peers of a 1:1 Signal session.
_USER_SERVERS = ("s.whatsapp.net", "c.us", "lid", "hosted", "hosted.lid")
_JID = re.compile(
    r"^(?P<user>[0-9]{1,20})(?::(?P<device>[0-9]{1,4}))?@(?P<server>" + "|".join(map(re.escape, _USER_SERVERS)) + r")\Z"
)


# The same rule as a JSON Schema / ECMAScript pattern (the OpenAPI document, the adapter's schema).
USER_JID_PATTERN = r"^[0-9]{1,20}(:[0-9]{1,4})?@(" + "|".join(map(re.escape, _USER_SERVERS)) + r")$"


class InvalidJid(ValueError):
    """A text that is not a user JID."""


@dataclass(frozen=True, slots=True)
class Jid:
    user: str
    device: int
    server: str

    @property
    def bare(self) -> str:
        """The bare number: the part before '@' and ':' (how the seed keys `baileys_auth`)."""
        return self.user


# The hot set of a fleet's JIDs (they repeat on every event); bounded at ~2 MB so a fleet of many phones
# (or fresh ones) does not turn it into memory that grows with the fleet. The result is immutable.
@lru_cache(maxsize=8_192)
def parse_jid(text: str) -> Jid:
    match = _JID.match(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidJid(f"not a WhatsApp user JID (expected digits@server, e.g. 79001112233@s.whatsapp.net): {text!r}")
    device = match.group("device")
    return Jid(user=match.group("user"), device=int(device) if device else 0, server=match.group("server"))


def bare_number(jid: str) -> str:
    """The seed's own cut: the part of a JID before '@' and ':' (no validation; for stored rows)."""
    return jid.split("@", 1)[0].split(":", 1)[0]
