"""The narrow interfaces the session runtime talks to. Adapters implement them; the runtime never imports one."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sidecar.rules.policy import Close, Counters, SessionState
from sidecar.rules.records import CloseTrigger, ClosureRecord, Notification, PhoneRef, Step, StepResult, moment
from sidecar.rules.restrictions import Restriction
from sidecar.rules.safety import BreakerStatus, LoopState, Mode


class StepQueue(Protocol):
    """The ordered, durable queue of database steps the runtime hands its effects to (sidecar.store.pending).

    `submit` accepts a step, waiting for room while the queue is full, and returns the future of its result;
    steps are applied in the order they were accepted.
    """

    async def submit(self, step: Step) -> asyncio.Future[StepResult]: ...


class SocketUnreachable(Exception):
    """No runtime connection owns this session (or it went away before answering)."""


class SocketLeftToRuntime(SocketUnreachable):
    """No runtime link at all (`ingest-logs` reads a log): the backend keeps and handles its own sockets."""


class SocketCommandFailed(Exception):
    """The runtime answered a command with ok=false."""


class SocketCommandUnsupported(SocketCommandFailed):
    """The runtime does not implement the command: its ack's error starts with `unsupported` (or `unknown command`,
    what adapters older than the command say). A runtime older than the sidecar, not a fault of the session."""


_UNSUPPORTED = re.compile(r"(unsupported|unknown command)\b", re.IGNORECASE)


def command_failure(error: str | None) -> SocketCommandFailed:
    """What a runtime's `ok:false` ack means (protocol v1), wherever it is read (this replica or another's)."""
    if error is not None and _UNSUPPORTED.match(error):
        return SocketCommandUnsupported(error)
    return SocketCommandFailed(error or "runtime answered ok=false")


class SocketController(Protocol):
    """Asks the messenger runtime to act on a session's socket."""

    async def end_session(self, organization_phone_id: int, reason: str, detail: str) -> int | None:
        """End the socket with a logout and do not reconnect. Returns once the runtime acknowledged, with the
        ack's `keysDeleted` (None when it said none: its keys are not its own to delete).

        `reason` is the close reason code (bad_mac_limit, …), `detail` a sentence for people.
        """

    async def clear_cached_keys(self, organization_phone_id: int, key_prefixes: Sequence[str]) -> int | None:
        """Drop the runtime's in-memory copies of keys with these prefixes; returns the ack's `keysDeleted`."""


@dataclass(frozen=True, slots=True)
class OwedEnd:
    command_id: str
    organization_phone_id: int
    reason: str
    detail: str


class OwedEnds(Protocol):
    async def owe(self, organization_phone_id: int, reason: str, detail: str) -> None:
        """Remember the end (one per phone: a later one replaces nothing)."""

    async def owed_phones(self) -> set[int]:
        """The phones with an end owed (a fleet's, read from the database)."""

    async def take_owed(self, organization_phone_id: int) -> OwedEnd | None:
        """Claim the phone's owed end for delivery (None: none, or another replica took it)."""

    async def owed_done(self, end: OwedEnd, delivered: bool) -> None:
        """Delivered (and recorded on the close), or back to owed."""

    async def owed_dropped(self, end: OwedEnd) -> None:
        """Moot (the phone was paired anew): forgotten."""

    def forget_owed(self, organization_phone_ids: list[int]) -> None:
        """The phones' state expired here (--state-ttl): what is owed to them in memory goes too."""


class LivenessSockets(Protocol):
    """Asks the runtime about a session's socket for the liveness watch (runtime link v1, additive)."""

    async def probe_session(self, organization_phone_id: int) -> float:
        """One real round trip with WhatsApp's server through the session's socket; returns milliseconds.
        Raises SocketUnreachable, or SocketCommandFailed when the round trip failed."""

    async def restart_session(self, organization_phone_id: int, reason: str, detail: str) -> None:
        """End the socket with a restartable status code, so the backend's usual reconnect runs (never a logout)."""


@dataclass(slots=True)
class OutboxRow:
    notification_id: str
    event: str
    organization_id: int
    organization_phone_id: int
    occurred_at: datetime
    stats: dict[str, Any]
    reason: str | None
    details: dict[str, Any]
    trace_id: str | None
    status: str = "pending"  # pending, delivered, dead, skipped
    attempts: int = 0
    last_error: str | None = None
    team: str | None = None
    delivered_at: datetime | None = None
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.notification_id,
            "event": self.event,
            "organizationId": self.organization_id,
            "organizationPhoneId": self.organization_phone_id,
            "occurredAt": self.occurred_at.isoformat(),
            "status": self.status,
            "attempts": self.attempts,
            "lastError": self.last_error,
            "team": self.team,
            "deliveredAt": self.delivered_at.isoformat() if self.delivered_at else None,
        }


class Outbox(Protocol):
    """Notifications waiting for delivery. `claim_due` leases the next due notification of each session
    (per-session order is kept: a later one waits while an earlier one is pending)."""

    async def claim_due(self, limit: int, lease_seconds: float) -> list[OutboxRow]: ...

    async def finish(
        self,
        notification_id: str,
        status: str,
        attempts: int,
        error: str | None,
        team: str | None,
        retry_in: float | None = None,
    ) -> None: ...

    async def list_notifications(self, status: str | None, limit: int) -> list[OutboxRow]: ...

    async def outbox_depth(self) -> int: ...


class StoreUnavailable(Exception):
    """The store cannot be reached right now; the step should be tried again later."""


class StoreSlow(StoreUnavailable):
    """A statement ran past the store's timeout: not an outage, not the step's fault. Queues that can name the
    step retry it a bounded number of times and then fail it; other callers treat it as unavailability."""


class TransientConflict(StoreUnavailable):
    """PostgreSQL aborted the transaction to resolve a conflict (deadlock, serialization): retry it at once."""


class KeyStoreFailed(Exception):
    """The key store answered, and the deletion failed for a reason of its own (a wrong type, a permission):
    not retried."""


@dataclass(frozen=True, slots=True)
class KeysRemoved:
    deleted: int
    failures: tuple[str, ...] = ()  # keys the store could not delete, each with why


class KeyStore(Protocol):
    """A phone's auth keys where the runtime keeps them outside the session store's database (keystores/)."""

    description: str  # for logs and check-config; never a password

    async def delete(self, phone: PhoneRef, prefixes: Sequence[str] | None, only_count: bool = False) -> KeysRemoved:
        """Delete (`only_count`: count) the phone's keys starting with one of `prefixes`; every key, creds too,
        with None. Raises StoreUnavailable when the store cannot be reached, KeyStoreFailed otherwise."""

    def name_of(self, phone: PhoneRef) -> str:
        """Where this phone's keys are (the hash key, the folder)."""

    async def ping(self) -> None:
        """Raises StoreUnavailable when the store cannot be reached."""

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StoredSession:
    phone: PhoneRef
    counters: Counters
    closed: bool
    closed_at: float | None = None  # epoch seconds, when the store knows it


@dataclass(frozen=True, slots=True)
class RestrictionEntry:
    """One line of a number's restriction timeline: a restriction in force (`active`, `at` is when it started),
    or a history row (it started, `active`, or was lifted, at `at`). `seq` orders the history (0 for one in
    force)."""

    organization_id: int
    organization_phone_id: int
    kind: str
    active: bool
    at: datetime
    until: datetime | None = None
    code: int | None = None
    detail: str | None = None
    seq: int = 0

    @classmethod
    def of(cls, phone: PhoneRef, restriction: Restriction, seq: int = 0) -> RestrictionEntry:
        at = moment(restriction.at)
        assert at is not None
        return cls(
            phone.organization_id, phone.organization_phone_id, str(restriction.kind), restriction.active, at,
            moment(restriction.until), restriction.code, restriction.detail, seq,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "organizationId": self.organization_id,
            "organizationPhoneId": self.organization_phone_id,
            "kind": self.kind,
            "active": self.active,
            ("since" if self.active and not self.seq else "at"): self.at.isoformat(),
            "until": self.until.isoformat() if self.until else None,
            "code": self.code,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class RestrictionQuery:
    """`GET /v1/restrictions`: the restrictions in force (`active`), by phone then kind after `after`; or the
    history, newest first, before the history position `before`."""

    active: bool = True
    limit: int = 100
    organization_id: int | None = None
    kind: str | None = None
    after: tuple[int, str] | None = None
    before: int | None = None


class RestrictionTimeline(Protocol):
    """The restriction timeline of every number (written by `RecordRestriction` steps), read by the API."""

    async def restrictions_in_force(self) -> list[RestrictionEntry]:
        """Every restriction the timeline holds in force, `until` passed or not (loaded at start)."""

    async def phone_restrictions(
        self, organization_phone_id: int, history: int
    ) -> tuple[list[RestrictionEntry], list[RestrictionEntry]]:
        """(in force now, the last `history` changes newest first)."""

    async def list_restrictions(self, query: RestrictionQuery) -> list[RestrictionEntry]: ...


@dataclass(frozen=True, slots=True)
class SharedFailure:
    """A failed message, as the loss ledger shares it between replicas."""

    phone: PhoneRef
    message_id: str
    deferred: bool = False  # the loss-aware policy's Bad MAC: counted by whichever replica finds it lost
    peer_user: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerSettled:
    """What one exchange with the loss ledger settled."""

    lost: frozenset[tuple[int, str]]  # of the due (phone, id) pairs, those lost and counted here
    orphans: tuple[SharedFailure, ...] = ()  # failures whose replica went away before their deadline: lost here


class LossLedger(Protocol):
    """The failed messages every replica can see (fleet mode: a failure on one replica, its recovery on another).
    One exchange per tick, in one transaction; StoreUnavailable leaves everything to the next one (nothing is
    counted lost while the replicas cannot agree)."""

    async def exchange(
        self,
        failed: Sequence[SharedFailure],
        recovered: Sequence[tuple[PhoneRef, str]],
        due: Sequence[tuple[int, str]],
        deadline: float,
        take_orphans: bool = True,
    ) -> LedgerSettled:
        """Share `failed`, mark `recovered`, settle `due` (each lost exactly once in the fleet: here, or not at
        all when another replica counted it or saw it recovered), and take the orphans past their deadline (not
        when the replica is stopping: `take_orphans` False)."""


class SessionStore(Outbox, RestrictionTimeline, Protocol):
    """Auth keys, phone status, closure log and durable counters, applied as ordered steps.

    `apply` runs the steps in order, in one transaction where the store has them. A step that fails on its own
    raises a `StepFailed` naming it; a store that cannot be reached raises `StoreUnavailable` and nothing of the
    batch is kept. `journal_seq` (when given) is the journal position of the last step: a store remembers it
    with the steps, and skips steps it has already applied, so a replay after a crash applies nothing twice.
    """

    async def apply(
        self, steps: Sequence[Step], journal: tuple[str, Sequence[int]] | None = None
    ) -> list[StepResult]: ...

    async def applied_journal_position(self, instance_id: str) -> int: ...

    async def load_sessions(self, closed_within: float | None = None) -> list[StoredSession]:
        """Phones with counts, and phones closed (within `closed_within` seconds, when given)."""

    async def prune(self, older_than: float, batch: int) -> dict[str, int]:
        """Retention: delete history older than `older_than` seconds (closures, decisions, finished
        notifications, idle counter rows), `batch` rows per statement. Returns rows deleted per table."""

    async def recent_closures(self, organization_phone_id: int, limit: int) -> list[ClosureRecord]: ...

    async def list_closures(self, query: ClosureQuery) -> list[ClosureRecord]:
        """Closures matching the query, newest first (started_at, then closure_id), at most `query.limit`."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class StepFailed(Exception):
    """One step of a batch failed for a reason of its own (not an outage)."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"step {index} failed: {type(error).__name__}: {error}")
        self.index = index
        self.error = error


# Fleet mode: decision state shared by every replica (sidecar.store.shared_decisions) -----------------


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """One phone's shared decision state, as the database holds it."""

    state: SessionState
    generation: int  # bumped by every close claim; fences a stale close's database half
    logged_out_at: float | None = None  # epoch seconds, while the phase is closed
    logged_out_observed: bool = False
    phone: PhoneRef | None = None
    loops: LoopState = field(default_factory=LoopState)


@dataclass(frozen=True, slots=True)
class FleetSettings:
    mode: Mode
    observe_organizations: frozenset[int]
    breaker_tripped_at: float | None
    breaker_kept_by: str | None


@dataclass(frozen=True, slots=True)
class ClaimedClose:
    phone: PhoneRef
    close: Close
    trigger: CloseTrigger
    generation: int


@dataclass(frozen=True, slots=True)
class ClosureQuery:
    """`GET /v1/closures`: every filter optional; `before` is the (started_at, closure_id) a page ended at."""

    limit: int = 100
    organization_id: int | None = None
    organization_phone_id: int | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: tuple[datetime, str] | None = None

    def matches(self, record: ClosureRecord) -> bool:
        phone = record.phone
        return (
            (self.organization_id is None or phone.organization_id == self.organization_id)
            and (self.organization_phone_id is None or phone.organization_phone_id == self.organization_phone_id)
            and (self.reason is None or str(record.reason) == self.reason)
            and (self.since is None or record.started_at >= self.since)
            and (self.until is None or record.started_at < self.until)
            and (self.before is None or (record.started_at, record.closure_id) < self.before)
        )


@dataclass(frozen=True, slots=True)
class JournalProgress:
    """What a decided batch tells the database about the undecided-events journal, in the batch's transaction:
    every position up to the highest decided is decided, except those `undecided_below` names (events of phones
    whose rows were locked elsewhere: decided later, out of order). A replay skips exactly the decided ones."""

    instance_id: str
    undecided_below: Callable[[int, frozenset[int]], list[int]]  # (high, positions this batch decided)


class FleetBatch(Protocol):
    """Decisions in progress: the batch's rows are locked until the block ends, then the saved states commit."""

    # Phones whose rows another PostgreSQL session holds locked: their events are not decided in this batch (the
    # decider parks them and retries; unrelated phones never wait for them).
    busy: frozenset[int]

    def already_decided(self, position: int) -> bool:
        """The undecided-events journal position was decided before (a replay after a crash skips it)."""

    def decided(self, positions: frozenset[int]) -> None:
        """The journal positions this batch decides (remembered with the decisions at commit)."""

    def taken(self, sequences: dict[str, int]) -> None:
        """The runtime link frames this batch completes (runtime id -> highest seq), remembered at commit."""

    def stored(self, organization_phone_id: int) -> StoredDecision:
        """The phone's state as locked at the start of the batch."""

    async def admit_automatic_close(self, phone: PhoneRef) -> tuple[bool, bool] | None:
        """The fleet breaker's admission of one automatic logout, counted on the database's clock: (admitted,
        this refusal tripped it); None when another session holds the breaker's lock (the event is retried)."""

    def save(
        self,
        phone: PhoneRef,
        state: SessionState,
        notification: Notification | None,
        close: tuple[Close, CloseTrigger] | None,
    ) -> int:
        """Write `state` (and a health flip's notification) at commit; a close claim (`close`) is stored and
        bumps the generation, which is returned (the current one otherwise)."""

    def save_loops(self, phone: PhoneRef, loops: LoopState) -> None:
        """Write the phone's reconnect-loop state at commit."""


class FleetState(Protocol):
    def deciding(
        self, phones: Sequence[PhoneRef], journal: JournalProgress | None, wait: bool = False
    ) -> AbstractAsyncContextManager[FleetBatch]:
        """Lock the phones' rows (created on first sight) for a batch of decisions; raises StoreUnavailable.
        Rows locked elsewhere are skipped (`FleetBatch.busy`) unless `wait` (an operator's close waits, bounded
        by the lock timeout). `journal`'s progress is remembered with the decisions."""

    async def stored(self, organization_phone_id: int) -> StoredDecision | None: ...

    async def settings(self) -> FleetSettings: ...

    async def seed_settings(self, mode: Mode, observe_organizations: frozenset[int]) -> None:
        """Store this replica's mode flags as the fleet's when the fleet has not seen them yet."""

    async def set_mode(self, mode: Mode, observe_organizations: frozenset[int]) -> None: ...

    async def trip_breaker(self, operator: str) -> bool:
        """Trip by hand; True if it was not tripped before."""

    async def keep_breaker(self, operator: str) -> bool:
        """False when the breaker is not tripped (nothing to keep)."""

    async def release_breaker(self) -> None: ...

    async def breaker_status(self) -> BreakerStatus:
        """Counted on the database's clock, as admissions are."""

    async def held_phones(self) -> list[PhoneRef]: ...

    async def release_close(self, organization_phone_id: int, generation: int) -> None:
        """Give a claimed close back (an operator's close that did not complete): the phone is active again."""

    async def renew_closes(self, organization_phone_ids: Sequence[int]) -> None:
        """Extend the lease of closes this replica is still carrying out."""

    async def take_over_closes(self, limit: int) -> list[ClaimedClose]:
        """Claim the closes whose claimer's lease expired (it died mid-close): they are this replica's now."""


class SocketLeases(Protocol):
    """Fleet mode: which replica holds each phone's runtime connection, and commands routed to that replica."""

    instance: str
    lease_seconds: float  # a replica that stops renewing loses its phones this long after its last heartbeat

    async def claim_many(self, claims: Sequence[tuple[int, int]]) -> dict[int, str]:
        """Claim (phone, connection id) pairs in one statement; the phones a live replica holds instead, with
        their holder."""

    async def claim(self, organization_phone_id: int, connection_id: int) -> str | None:
        """Take (or renew) the lease; returns None when held here now, else the replica whose lease is live."""

    async def release(self, organization_phone_ids: Sequence[int]) -> None: ...

    async def renew(self, sessions: int) -> None:
        """This replica's lease (one row, whatever it holds), with how many sessions it holds."""

    async def forget_commands(self, batch: int = 1000) -> int:
        """Housekeeping of answered commands, a bounded batch; returns how many went."""

    async def owner(self, organization_phone_id: int) -> str | None:
        """The replica whose lease on the phone is live, if any."""

    async def send(self, owner: str, organization_phone_id: int, body: dict[str, Any]) -> str:
        """Queue a command for the owner and wake it; returns the command id."""

    async def result(self, command_id: str) -> tuple[str, str | None, int | None]:
        """(status, error, keys deleted): pending, delivering, ok, failed or unreachable."""

    async def take_commands(self) -> list[tuple[str, int, dict[str, Any]]]:
        """The commands addressed to this replica, marked as being delivered."""

    async def finish(self, command_id: str, status: str, error: str | None, keys_deleted: int | None = None) -> None:
        """`keys_deleted`: what the runtime's ack said it deleted (--key-store runtime)."""
