"""The session rules, pure: counters, limits, health, and what to do about each event.

Nothing here does I/O, reads a clock or keeps global state. `decide` takes a session's state and one event
and returns the next state plus a decision; the runtime (sidecar.runtime) carries decisions out.
Over 300 lines because `decide` and the windowed policy share the state types and are read (and property-
tested) together.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TypedDict


class CloseReason(StrEnum):
    BAD_MAC_LIMIT = "bad_mac_limit"
    BAD_DECRYPT_LIMIT = "bad_decrypt_limit"
    FORCED = "forced"
    CONNECTION_ERROR = "connection_error"


class KeyScope(StrEnum):
    """Which auth keys an action deletes (the `scope` label of whatsapp_auth_keys_deleted_total)."""

    APP_STATE_SYNC = "app_state_sync"
    PEER_SESSION = "peer_session"
    ALL = "all"


class Phase(StrEnum):
    ACTIVE = "active"
    # At a limit while the fleet circuit breaker forbids automatic logouts: counters keep counting, no heal,
    # no close, until the phone opens again or an operator closes it.
    HELD = "held"
    CLOSING = "closing"
    CLOSED = "closed"


class HealthPolicy(StrEnum):
    """`counters`: the seed's counters, reset on open. `windowed`: errors within a sliding window, Bad MAC counted
    once per distinct failing peer, so one broken contact is healed but never logs the phone out."""

    COUNTERS = "counters"
    WINDOWED = "windowed"
    # `loss-aware`: as `counters`, but a Bad MAC whose message the runtime named (messageId) counts only once its
    # --loss-deadline passes unrecovered (rules/loss.py); it is healed at once all the same.
    LOSS_AWARE = "loss-aware"


CRYPTO_LIMIT_REASONS = frozenset({CloseReason.BAD_MAC_LIMIT, CloseReason.BAD_DECRYPT_LIMIT})


APP_STATE_SYNC_PREFIX = "app-state-sync-"
SESSION_PREFIX = "session-"
SENDER_KEY_PREFIX = "sender-key-"
PRE_KEY_PREFIX = "pre-key-"

# Baileys' DisconnectReason codes after which the credentials are dead: loggedOut, forbidden,
# multideviceMismatch. Transient codes (408, 428, 440, 503, 515) only make the runtime reconnect.
DEFAULT_CRITICAL_STATUS_CODES = frozenset({401, 403, 411})


@dataclass(frozen=True, slots=True)
class Limits:
    max_bad_mac_errors: int = 3
    max_bad_decrypt_errors: int = 5

    def __post_init__(self) -> None:
        for name in ("max_bad_mac_errors", "max_bad_decrypt_errors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    limits: Limits = field(default_factory=Limits)
    # Deleting pre-keys on a Bad MAC heal makes peers fail with "Invalid PreKey ID"; off unless asked for.
    delete_prekeys_on_heal: bool = False
    critical_status_codes: frozenset[int] = DEFAULT_CRITICAL_STATUS_CODES
    health: HealthPolicy = HealthPolicy.COUNTERS
    window_seconds: float = 600.0


@dataclass(frozen=True, slots=True)
class Counters:
    bad_mac_errors: int = 0
    bad_decrypt_errors: int = 0


ZERO = Counters()


@dataclass(frozen=True, slots=True)
class Recent:
    """The windowed policy's memory: when each counted error happened, and from which peer (None: unnamed)."""

    bad_mac: tuple[tuple[float, str | None], ...] = ()
    bad_decrypt: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionState:
    counters: Counters = ZERO
    phase: Phase = Phase.ACTIVE
    recent: Recent = Recent()


# Events -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadMac:
    """A Bad MAC class failure; `peer_user` is the failing peer's bare number when the runtime named it.
    `at` (epoch seconds, given by the caller) matters only to the windowed policy."""

    peer_user: str | None = None
    at: float = 0.0
    # loss-aware: `pending`, its message may still be recovered (healed, not counted); `late`, its message was
    # lost (counted now, healed already).
    pending: bool = False
    late: bool = False


@dataclass(frozen=True, slots=True)
class BadDecrypt:
    """An app-state 'bad decrypt' class failure."""

    at: float = 0.0


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    status_code: int | None = None


@dataclass(frozen=True, slots=True)
class OperatorClose:
    reason: str


@dataclass(frozen=True, slots=True)
class CloseCompleted:
    """The runtime finished carrying out a close."""


Event = BadMac | BadDecrypt | ConnectionOpened | ConnectionClosed | OperatorClose | CloseCompleted


# Decisions --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoAction:
    pass


@dataclass(frozen=True, slots=True)
class Heal:
    """Delete the phone's auth keys that start with one of `key_prefixes`; the session stays up."""

    scope: KeyScope
    key_prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Close:
    """End the socket, delete all keys, mark logged_out, record, clear counters, forget the session."""

    reason: CloseReason
    detail: str
    counters: Counters


@dataclass(frozen=True, slots=True)
class Hold:
    """A limit was reached but automatic logouts are suspended (the fleet circuit breaker is open)."""

    reason: CloseReason
    detail: str
    counters: Counters


Decision = NoAction | Heal | Close | Hold

NOTHING = NoAction()


@dataclass(frozen=True, slots=True)
class Transition:
    state: SessionState
    decision: Decision


class ErrorStats(TypedDict):
    """The seed's getSessionErrorStats shape (camelCase keys are part of the public contract)."""

    badMacErrors: int
    badDecryptErrors: int
    maxBadMacErrors: int
    maxBadDecryptErrors: int
    isHealthy: bool


def warning_threshold(limit: int) -> int:
    """The count at which a session stops being healthy: one short of the limit (never below 1)."""
    return max(limit - 1, 1)


def is_healthy(counters: Counters, limits: Limits) -> bool:
    return counters.bad_mac_errors < warning_threshold(
        limits.max_bad_mac_errors
    ) and counters.bad_decrypt_errors < warning_threshold(limits.max_bad_decrypt_errors)


def error_stats(counters: Counters, limits: Limits) -> ErrorStats:
    return {
        "badMacErrors": counters.bad_mac_errors,
        "badDecryptErrors": counters.bad_decrypt_errors,
        "maxBadMacErrors": limits.max_bad_mac_errors,
        "maxBadDecryptErrors": limits.max_bad_decrypt_errors,
        "isHealthy": is_healthy(counters, limits),
    }


def bad_mac_heal_prefixes(peer_user: str | None, config: PolicyConfig) -> tuple[str, ...]:
    """The narrowest key set that can heal a Bad MAC.

    Baileys stores a peer's Signal session as `session-<user>.<device>` (6.x) or `session-<user>_<domain>.<device>`
    (7.x LID addresses), so a named peer loses only its own sessions; otherwise every session and sender key.
    """
    prefixes: tuple[str, ...]
    if peer_user:
        prefixes = (f"{SESSION_PREFIX}{peer_user}.", f"{SESSION_PREFIX}{peer_user}_")
    else:
        prefixes = (SESSION_PREFIX, SENDER_KEY_PREFIX)
    if config.delete_prekeys_on_heal:
        prefixes += (PRE_KEY_PREFIX,)
    return prefixes


def decide(
    state: SessionState, event: Event, config: PolicyConfig, *, automatic_closes_allowed: bool = True
) -> Transition:
    """Apply one event to a session and say what must happen. With `automatic_closes_allowed` False (the fleet
    circuit breaker is open) a crypto limit holds the session instead of closing it."""
    counters = state.counters
    limits = config.limits

    if isinstance(event, ConnectionOpened):
        # A clean slate after recovery. A close already under way still finishes (a close never reopens).
        phase = Phase.CLOSING if state.phase is Phase.CLOSING else Phase.ACTIVE
        return Transition(SessionState(ZERO, phase), NOTHING)

    if isinstance(event, CloseCompleted):
        return Transition(SessionState(ZERO, Phase.CLOSED), NOTHING)

    if state.phase is Phase.HELD:
        if isinstance(event, OperatorClose):
            return _close(counters, CloseReason.FORCED, event.reason)
        if isinstance(event, BadMac | BadDecrypt):
            if isinstance(event, BadMac) and event.pending:
                return Transition(state, NOTHING)
            held = _counted(state, event, config)
            return Transition(replace(held, phase=Phase.HELD), NOTHING)
        return Transition(state, NOTHING)

    if state.phase is not Phase.ACTIVE:
        # Closing or closed: nothing more happens until the phone opens again.
        return Transition(state, NOTHING)

    if isinstance(event, BadMac) and event.pending:
        return Transition(state, Heal(KeyScope.PEER_SESSION, bad_mac_heal_prefixes(event.peer_user, config)))

    if isinstance(event, BadMac | BadDecrypt):
        counted = _counted(state, event, config)
        counters = counted.counters
        if isinstance(event, BadMac) and counters.bad_mac_errors >= limits.max_bad_mac_errors:
            detail = f"{counters.bad_mac_errors} Bad MAC errors (limit {limits.max_bad_mac_errors})"
            return _limit(counted, CloseReason.BAD_MAC_LIMIT, detail, automatic_closes_allowed)
        if isinstance(event, BadDecrypt) and counters.bad_decrypt_errors >= limits.max_bad_decrypt_errors:
            detail = f"{counters.bad_decrypt_errors} bad decrypt errors (limit {limits.max_bad_decrypt_errors})"
            return _limit(counted, CloseReason.BAD_DECRYPT_LIMIT, detail, automatic_closes_allowed)
        if isinstance(event, BadMac) and event.late:
            return Transition(counted, NOTHING)  # healed when it failed
        if isinstance(event, BadMac):
            return Transition(counted, Heal(KeyScope.PEER_SESSION, bad_mac_heal_prefixes(event.peer_user, config)))
        return Transition(counted, Heal(KeyScope.APP_STATE_SYNC, (APP_STATE_SYNC_PREFIX,)))

    if isinstance(event, ConnectionClosed):
        if event.status_code is not None and event.status_code in config.critical_status_codes:
            return _close(counters, CloseReason.CONNECTION_ERROR, f"connection closed with status {event.status_code}")
        return Transition(state, NOTHING)

    if isinstance(event, OperatorClose):
        return _close(counters, CloseReason.FORCED, event.reason)

    raise TypeError(f"unknown event {event!r}")  # pragma: no cover - the Event union is closed


def _close(counters: Counters, reason: CloseReason, detail: str) -> Transition:
    return Transition(SessionState(counters, Phase.CLOSING), Close(reason, detail, counters))


def _limit(counted: SessionState, reason: CloseReason, detail: str, allowed: bool) -> Transition:
    if allowed:
        return _close(counted.counters, reason, detail)
    return Transition(replace(counted, phase=Phase.HELD), Hold(reason, detail, counted.counters))


def _counted(state: SessionState, event: BadMac | BadDecrypt, config: PolicyConfig) -> SessionState:
    """The state with this error counted, by the configured health policy."""
    counters = state.counters
    if config.health is not HealthPolicy.WINDOWED:
        if isinstance(event, BadMac):
            return replace(state, counters=replace(counters, bad_mac_errors=counters.bad_mac_errors + 1))
        return replace(state, counters=replace(counters, bad_decrypt_errors=counters.bad_decrypt_errors + 1))
    return windowed(state, event, config.window_seconds)


def windowed(
    state: SessionState, event: BadMac | BadDecrypt | None, window: float, now: float | None = None
) -> SessionState:
    """The windowed policy: forget errors older than `window` seconds, then count this one. Bad MAC counts
    distinct failing peers (unnamed peers count each), bad decrypt counts errors."""
    at = event.at if event is not None else (now or 0.0)
    cutoff = at - window
    bad_mac = tuple(item for item in state.recent.bad_mac if item[0] > cutoff)
    bad_decrypt = tuple(moment for moment in state.recent.bad_decrypt if moment > cutoff)
    if isinstance(event, BadMac):
        # One entry per named peer: its latest error. Unnamed errors cannot be told apart, so each counts.
        if event.peer_user is not None:
            bad_mac = tuple(item for item in bad_mac if item[1] != event.peer_user)
        bad_mac += ((event.at, event.peer_user),)
    elif isinstance(event, BadDecrypt):
        bad_decrypt += (event.at,)
    counters = Counters(bad_mac_errors=len(bad_mac), bad_decrypt_errors=len(bad_decrypt))
    return replace(state, counters=counters, recent=Recent(bad_mac, bad_decrypt))
