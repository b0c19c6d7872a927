"""What an app-state sync failure means: Baileys' log messages for it, one table, first match wins. Pure.

The table is the one definition: the classifier reads it, so does the log reader (ingest/baileys_log.py), and
the Baileys adapter reads the same table from integrations/baileys/app-state-messages.json (written from
`app_state_table()` by `python -m docs.generate`). Patterns are written in the syntax Python's `re` and
ECMAScript share.

Baileys 7 skips an app-state record it cannot decrypt, or whose value MAC fails, without a word; what it still
logs is below. Two kinds show that this device's own app-state keys or state are wrong, which deleting them
heals, so they count toward the Bad Decrypt limit; the others are counted and shown
(`whatsapp_app_state_sync_failures_total{collection,kind}`) but deleting keys would not help them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

# Baileys' app-state collections (its WAPatchName); any other name is reported as "other".
COLLECTIONS = ("critical_block", "critical_unblock_low", "regular_high", "regular_low", "regular")
OTHER_COLLECTION = "other"


class AppStateKind(StrEnum):
    DECRYPT = "decrypt"  # 6.x: a patch or snapshot fails to decrypt (OpenSSL's bad decrypt in the stack)
    PATCH_MAC = "patch_mac"  # 7.x, appStateMacVerification.patch: a patch's MAC fails under our key
    LTHASH_PATCH = "lthash_patch"  # 7.x, MAC verification: our state no longer hashes to the server's
    LTHASH_SNAPSHOT = "lthash_snapshot"  # 7.x, MAC verification: a snapshot held records we could not use
    MISSING_KEY = "missing_key"  # 7.x: the key a patch names is not in our store; parked until the phone shares it
    SNAPSHOT_RETRY = "snapshot_retry"  # 7.x: a sync failed; Baileys retries from a full snapshot
    GAVE_UP = "gave_up"  # 7.x: a sync failed again (or on a TypeError); the collection stays stale


class FoundIn(StrEnum):
    ERROR = "error"  # the text of an error logged under one of WRAPPER_MESSAGES (a stack's first line)
    MESSAGE = "message"  # the log record's message itself (Baileys 7)


# Messages under which Baileys logs an app-state error whose text tells the kind: 6.x (info level) and 7.x with
# appStateMacVerification (a patch whose MAC fails).
WRAPPER_MESSAGES = ("failed to sync state from version", "failed to decode patch, skipping")


@dataclass(frozen=True, slots=True)
class Signal:
    source: str  # the pattern, searched (not anchored unless it says so)
    ignore_case: bool
    kind: AppStateKind
    counts_toward_limit: bool
    found_in: FoundIn
    meaning: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", re.compile(self.source, re.I if self.ignore_case else 0))


APP_STATE_SIGNALS: tuple[Signal, ...] = (
    Signal(
        r"Invalid patch mac",
        True,
        AppStateKind.PATCH_MAC,
        True,
        FoundIn.ERROR,
        "a patch signed with a key other than the one our store holds under its id: our app-state key is stale",
    ),
    Signal(
        r"bad decrypt|ERR_OSSL_BAD_DECRYPT|wrong final block length",
        True,
        AppStateKind.DECRYPT,
        True,
        FoundIn.ERROR,
        "a patch or snapshot that our app-state key cannot decrypt (Baileys 6.x logs it)",
    ),
    Signal(
        r"LTHash verification failed, skipping remaining patches",
        False,
        AppStateKind.LTHASH_PATCH,
        True,
        FoundIn.MESSAGE,
        "after applying patches our state's hash differs from the server's: our local app state is corrupt",
    ),
    Signal(
        r"LTHash verification failed on snapshot",
        False,
        AppStateKind.LTHASH_SNAPSHOT,
        False,
        FoundIn.MESSAGE,
        "a server snapshot held records that could not be decrypted or verified; Baileys keeps partial state",
    ),
    Signal(
        r"blocked on missing key from v\d+, parking",
        False,
        AppStateKind.MISSING_KEY,
        False,
        FoundIn.MESSAGE,
        "the key a patch names is missing; the collection waits for the phone to share it",
    ),
    Signal(
        r"failed to sync \S+ from v\d+, forcing snapshot retry",
        False,
        AppStateKind.SNAPSHOT_RETRY,
        False,
        FoundIn.MESSAGE,
        "a sync failed (download, decode); Baileys asks for a full snapshot once",
    ),
    Signal(
        r"failed to sync \S+ from v\d+, giving up",
        False,
        AppStateKind.GAVE_UP,
        False,
        FoundIn.MESSAGE,
        "a sync failed twice, or with a TypeError (no network); the collection stays stale until the next sync",
    ),
)


def app_state_signal(text: str) -> Signal | None:
    """The signal an app-state error text (a Baileys log message, or an error's first line) shows, if any."""
    for signal in APP_STATE_SIGNALS:
        if signal.pattern.search(text):
            return signal
    return None


def collection_label(name: str | None) -> str:
    return name if name in COLLECTIONS else OTHER_COLLECTION


def error_signal(text: str) -> Signal | None:
    """The signal of an error text logged under a wrapper message (6.x's bad decrypt, 7.x's invalid patch MAC)."""
    return next((signal for signal in APP_STATE_SIGNALS if signal.found_in is FoundIn.ERROR and
                 signal.pattern.search(text)), None)  # fmt: skip


def app_state_table() -> dict[str, object]:
    """The table as the Baileys adapter reads it (integrations/baileys/app-state-messages.json)."""
    return {
        "generatedFrom": "sidecar/rules/app_state.py (python -m docs.generate); do not edit by hand",
        "collections": list(COLLECTIONS),
        "wrapperMessages": list(WRAPPER_MESSAGES),
        "signals": [
            {
                "pattern": signal.source,
                "flags": "i" if signal.ignore_case else "",
                "kind": str(signal.kind),
                "countsTowardLimit": signal.counts_toward_limit,
                "foundIn": str(signal.found_in),
            }
            for signal in APP_STATE_SIGNALS
        ],
    }
