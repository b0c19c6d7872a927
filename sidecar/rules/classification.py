"""Which class a raw decryption error belongs to: one table, first match wins.

Texts come from libsignal, Baileys and OpenSSL as a runtime reports them (an error message, or a whole stack
string that starts with it). Only `bad_mac` and `bad_decrypt` drive the session rules; the rest are counted.
App-state texts are read by the app-state table (rules/app_state.py): the signals that a key deletion heals
are `bad_decrypt`, the others `app_state_sync`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sidecar.rules.app_state import app_state_signal


class ErrorClass(StrEnum):
    BAD_MAC = "bad_mac"
    BAD_DECRYPT = "bad_decrypt"
    NO_SESSION = "no_session"
    PREKEY = "prekey"
    COUNTER = "counter"
    SENDER_KEY = "sender_key"
    MEDIA = "media"
    APP_STATE_SYNC = "app_state_sync"
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

BAD_MAC_RULES: tuple[Rule, ...] = (
    # libsignal's pkmsg path throws "Bad MAC" itself (also "Bad MAC length"); its msg path prints the Bad MAC
    # and throws "No matching sessions found for message" instead.
    Rule("Bad MAC", ErrorClass.BAD_MAC, frozenset({ErrorSource.MESSAGE, None})),
    Rule("No matching sessions found for message", ErrorClass.BAD_MAC, frozenset({ErrorSource.MESSAGE, None})),
)
# Then, for app-state (or unknown) sources, the app-state table: OpenSSL's bad decrypt (error:1C800064,
# ERR_OSSL_BAD_DECRYPT), a truncated block, Baileys' patch MAC and LTHash checks, its retries and give-ups.
# Never from media (a media download failing is not an app-state fault).
OTHER_RULES: tuple[Rule, ...] = (
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
    for rule in BAD_MAC_RULES:
        if rule.matches(error_text, folded, source):
            return rule.error_class
    if source in _NOT_MESSAGE and (signal := app_state_signal(error_text)) is not None:
        return ErrorClass.BAD_DECRYPT if signal.counts_toward_limit else ErrorClass.APP_STATE_SYNC
    for rule in OTHER_RULES:
        if rule.matches(error_text, folded, source):
            return rule.error_class
    return ErrorClass.OTHER


CLASSIFICATION_TABLE = BAD_MAC_RULES + OTHER_RULES
