"""What an app-state sync failure means: Baileys' log messages for it, one table, first match wins. Pure.

Baileys 7 skips an app-state record it cannot decrypt, or whose value MAC fails, without a word; what it still
logs is below. Two kinds show that this device's own app-state keys or state are wrong, which deleting them
heals, so they count toward the Bad Decrypt limit; the others are counted and shown
(`whatsapp_app_state_sync_failures_total{collection,kind}`) but deleting keys would not help them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Signal:
    pattern: re.Pattern[str]
    kind: AppStateKind
    counts_toward_limit: bool
    meaning: str


APP_STATE_SIGNALS: tuple[Signal, ...] = (
    Signal(
        re.compile(r"Invalid patch mac", re.I),
        AppStateKind.PATCH_MAC,
        True,
        "a patch signed with a key other than the one our store holds under its id: our app-state key is stale",
    ),
    Signal(
        re.compile(r"bad decrypt|ERR_OSSL_BAD_DECRYPT|wrong final block length", re.I),
        AppStateKind.DECRYPT,
        True,
        "a patch or snapshot that our app-state key cannot decrypt (Baileys 6.x logs it)",
    ),
    Signal(
        re.compile(r"LTHash verification failed, skipping remaining patches"),
        AppStateKind.LTHASH_PATCH,
        True,
        "after applying patches our state's hash differs from the server's: our local app state is corrupt",
    ),
    Signal(
        re.compile(r"LTHash verification failed on snapshot"),
        AppStateKind.LTHASH_SNAPSHOT,
        False,
        "a server snapshot held records that could not be decrypted or verified; Baileys keeps partial state",
    ),
    Signal(
        re.compile(r"blocked on missing key from v\d+, parking"),
        AppStateKind.MISSING_KEY,
        False,
        "the key a patch names is missing; the collection waits for the phone to share it",
    ),
    Signal(
        re.compile(r"failed to sync \S+ from v\d+, forcing snapshot retry"),
        AppStateKind.SNAPSHOT_RETRY,
        False,
        "a sync failed (download, decode); Baileys asks for a full snapshot once",
    ),
    Signal(
        re.compile(r"failed to sync \S+ from v\d+, giving up"),
        AppStateKind.GAVE_UP,
        False,
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
