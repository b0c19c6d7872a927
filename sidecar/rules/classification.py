"""Which class a raw decryption error belongs to: one table, first match wins.

Texts come from libsignal, Baileys and OpenSSL as a runtime reports them (an error message, or a whole stack
string that starts with it). Only `bad_mac` and `bad_decrypt` drive the session rules; the rest are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorClass(StrEnum):
    BAD_MAC = "bad_mac"
    BAD_DECRYPT = "bad_decrypt"
    NO_SESSION = "no_session"
    PREKEY = "prekey"
    COUNTER = "counter"
    SENDER_KEY = "sender_key"
    MEDIA = "media"
    OTHER = "other"


class ErrorSource(StrEnum):
    MESSAGE = "message"
    APP_STATE = "app-state"
    MEDIA = "media"


@dataclass(frozen=True, slots=True)
class Rule:
    needle: str
    error_class: ErrorClass
    # None: any source (including an unknown one); otherwise the rule applies only to these sources.
    sources: frozenset[ErrorSource | None] | None = None
    case_sensitive: bool = True

    def matches(self, text: str, folded: str, source: ErrorSource | None) -> bool:
        if self.sources is not None and source not in self.sources:
            return False
        return self.needle in text if self.case_sensitive else self.needle.lower() in folded


_NOT_MESSAGE = frozenset({ErrorSource.APP_STATE, None})

CLASSIFICATION_TABLE: tuple[Rule, ...] = (
    # libsignal's pkmsg path throws "Bad MAC" itself (also "Bad MAC length"); its msg path prints the Bad MAC
    # and throws "No matching sessions found for message" instead.
    Rule("Bad MAC", ErrorClass.BAD_MAC, frozenset({ErrorSource.MESSAGE, None})),
    Rule("No matching sessions found for message", ErrorClass.BAD_MAC, frozenset({ErrorSource.MESSAGE, None})),
    # App-state patches: OpenSSL's bad decrypt (error:1C800064, ERR_OSSL_BAD_DECRYPT), a truncated block, or
    # Baileys' own MAC check. Never from media (a media download failing is not an app-state fault).
    Rule("ERR_OSSL_BAD_DECRYPT", ErrorClass.BAD_DECRYPT, _NOT_MESSAGE),
    Rule("bad decrypt", ErrorClass.BAD_DECRYPT, _NOT_MESSAGE, case_sensitive=False),
    Rule("wrong final block length", ErrorClass.BAD_DECRYPT, _NOT_MESSAGE, case_sensitive=False),
    Rule("Invalid patch mac", ErrorClass.BAD_DECRYPT, _NOT_MESSAGE, case_sensitive=False),
    Rule("Invalid PreKey ID", ErrorClass.PREKEY),
    Rule("No session record", ErrorClass.NO_SESSION),
    Rule("Key used already or never filled", ErrorClass.COUNTER),
    Rule("Received message with old counter", ErrorClass.COUNTER),
    Rule("No SenderKeyRecord found", ErrorClass.SENDER_KEY),
    Rule("No session found to decrypt message", ErrorClass.SENDER_KEY),  # group skmsg without a sender key
    Rule("Invalid signature", ErrorClass.SENDER_KEY),  # a group sender-key message that fails its signature
)


def classify(error_text: str, source: ErrorSource | None = None) -> ErrorClass:
    if source is ErrorSource.MEDIA:
        return ErrorClass.MEDIA
    folded = error_text.lower()
    for rule in CLASSIFICATION_TABLE:
        if rule.matches(error_text, folded, source):
            return rule.error_class
    return ErrorClass.OTHER
