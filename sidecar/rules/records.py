"""What the runtime asks the database to do (steps), and what a close leaves behind (closure records)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sidecar.rules.policy import CloseReason, Counters, KeyScope
from sidecar.rules.restrictions import Restriction, RestrictionKind


class CounterKind(StrEnum):
    BAD_MAC = "bad_mac"
    BAD_DECRYPT = "bad_decrypt"


class CloseTrigger(StrEnum):
    AUTOMATIC = "automatic"  # a crypto limit was reached
    OPERATOR = "operator"  # forceCloseSession
    CONNECTION = "connection"  # the runtime reported a critical close code


class StepOutcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    PENDING = "pending"  # waiting for PostgreSQL to come back
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class PhoneRef:
    organization_id: int
    organization_phone_id: int
    # The bare number that keys `baileys_auth`; None when no event named it yet (looked up in the phone table).
    phone_user: str | None = None


class NotificationEvent(StrEnum):
    UNHEALTHY = "session.unhealthy"
    RECOVERED = "session.recovered"
    CLOSED = "session.closed"
    HELD = "session.held"  # a limit was reached while the circuit breaker holds automatic logouts
    RECONNECTED_AFTER_LOGOUT = "session.reconnected_after_logout"
    RECONNECT_LOOP = "session.reconnect_loop"
    CREDENTIALS_CONFLICT = "session.credentials_conflict"
    DEAF = "session.deaf"  # connected, but nothing arrives (rules/liveness.py)
    DEAF_RECOVERED = "session.deaf_recovered"  # traffic arrives again on a session found deaf
    RESTRICTED = "session.restricted"  # WhatsApp restricts the number (rules/restrictions.py)
    RESTRICTION_LIFTED = "session.restriction_lifted"
    LOSING_MESSAGES = "session.losing_messages"  # a session's first messages lost (rules/loss.py)
    BREAKER_TRIPPED = "breaker.tripped"  # fleet-level: organizationId and organizationPhoneId are 0
    BREAKER_RELEASED = "breaker.released"


@dataclass(frozen=True, slots=True)
class Notification:
    """An owner notification, written to the outbox in the same transaction as the change that caused it."""

    notification_id: str
    event: NotificationEvent
    occurred_at: datetime
    stats: dict[str, Any]
    reason: str | None = None
    trace_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.notification_id,
            "event": str(self.event),
            "occurredAt": self.occurred_at.isoformat(),
            "stats": self.stats,
            "reason": self.reason,
            "traceId": self.trace_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Notification:
        return cls(
            data["id"],
            NotificationEvent(data["event"]),
            datetime.fromisoformat(data["occurredAt"]),
            data["stats"],
            data["reason"],
            data["traceId"],
        )


@dataclass(frozen=True, slots=True)
class IncrementCounter:
    phone: PhoneRef
    kind: CounterKind
    notification: Notification | None = None


@dataclass(frozen=True, slots=True)
class ResetCounters:
    phone: PhoneRef
    notification: Notification | None = None


@dataclass(frozen=True, slots=True)
class DeleteKeys:
    """A heal: delete the phone's keys starting with any of `key_prefixes` (observe: only count them)."""

    phone: PhoneRef
    scope: KeyScope
    key_prefixes: tuple[str, ...]
    observe: bool = False


@dataclass(frozen=True, slots=True)
class RecordDecision:
    """A safety decision for the closure log: breaker tripped/released/kept, a session held, an incident.
    `phone` is None for fleet-level decisions."""

    decision_id: str
    decision: str
    decided_at: datetime
    phone: PhoneRef | None
    detail: dict[str, Any]
    notification: Notification | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "decisionId": self.decision_id,
            "decision": self.decision,
            "decidedAt": self.decided_at.isoformat(),
            "organizationId": self.phone.organization_id if self.phone else None,
            "organizationPhoneId": self.phone.organization_phone_id if self.phone else None,
            "detail": self.detail,
        }


@dataclass(slots=True)
class ClosureRecord:
    closure_id: str
    phone: PhoneRef
    reason: CloseReason
    trigger: CloseTrigger
    detail: str
    counters: Counters
    started_at: datetime
    socket: str = StepOutcome.PENDING
    keys_deleted: int | None = None
    steps: dict[str, str] = field(default_factory=dict)
    duration_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The public shape (API, closure log file)."""
        return {
            "closureId": self.closure_id,
            "organizationId": self.phone.organization_id,
            "organizationPhoneId": self.phone.organization_phone_id,
            "reason": str(self.reason),
            "trigger": str(self.trigger),
            "detail": self.detail,
            "badMacErrors": self.counters.bad_mac_errors,
            "badDecryptErrors": self.counters.bad_decrypt_errors,
            "startedAt": self.started_at.isoformat(),
            "socket": self.socket,
            "keysDeleted": self.keys_deleted,
            "steps": dict(self.steps),
            "durationSeconds": self.duration_seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], phone_user: str | None = None) -> ClosureRecord:
        return cls(
            closure_id=data["closureId"],
            phone=PhoneRef(data["organizationId"], data["organizationPhoneId"], phone_user),
            reason=CloseReason(data["reason"]),
            trigger=CloseTrigger(data["trigger"]),
            detail=data["detail"],
            counters=Counters(data["badMacErrors"], data["badDecryptErrors"]),
            started_at=datetime.fromisoformat(data["startedAt"]),
            socket=data["socket"],
            keys_deleted=data["keysDeleted"],
            steps=dict(data["steps"]),
            duration_seconds=data["durationSeconds"],
        )


@dataclass(frozen=True, slots=True)
class Logout:
    """The database half of a close: delete all keys, mark logged_out, record the closure, clear counters,
    and (with `notification`) put the `session.closed` notification in the outbox. Observe: keys are counted,
    not deleted, and the phone's status is left alone; the closure record says what would have happened."""

    record: ClosureRecord
    notification: Notification | None = None
    observe: bool = False
    # Fleet mode: the close claim's generation; the step is skipped once the stored row carries another.
    generation: int | None = None
    # The keys are not the store's (--key-store): the record's authKeys step and keys_deleted say what happened.
    keys_given: bool = False


@dataclass(frozen=True, slots=True)
class RecordRestriction:
    """A restriction reported in force (`restriction.active`) or lifted, for the number's timeline. The store
    decides whether it is news, against the timeline it holds (shared by replicas): a restriction not in force
    before, or one in force that is lifted. Only news writes a history row and the notification; the step's
    result is 1 for news, 0 otherwise."""

    phone: PhoneRef
    restriction: Restriction
    notification: Notification | None = None


Step = IncrementCounter | ResetCounters | DeleteKeys | Logout | RecordDecision | RecordRestriction


def closed_details(record: ClosureRecord, keys_deleted: int | None) -> dict[str, Any]:
    """What a `session.closed` notification says about the close besides the stats."""
    return {
        "closureId": record.closure_id,
        "trigger": str(record.trigger),
        "detail": record.detail,
        "badMacErrors": record.counters.bad_mac_errors,
        "badDecryptErrors": record.counters.bad_decrypt_errors,
        "keysDeleted": keys_deleted,
    }


def moment(epoch: float | None) -> datetime | None:
    """Epoch seconds as an aware UTC datetime."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def restriction_details(restriction: Restriction) -> dict[str, Any]:
    """What a `session.restricted` or `session.restriction_lifted` notification says about the restriction."""
    at, until = moment(restriction.at), moment(restriction.until)
    return {
        "kind": str(restriction.kind),
        "active": restriction.active,
        "at": at.isoformat() if at else None,
        "until": until.isoformat() if until else None,
        "code": restriction.code,
        "detail": restriction.detail,
    }


@dataclass(frozen=True, slots=True)
class LogoutResult:
    keys_deleted: int | None
    steps: dict[str, str]
    # When each part ran (time.time_ns() start and end), so the close's trace shows real durations.
    timings: dict[str, tuple[int, int]] = field(default_factory=dict)


StepResult = int | LogoutResult | None


def step_kind(step: Step) -> str:
    """A step's kind as a metric label: increment_counter, delete_keys, logout, ..."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in type(step).__name__).lstrip("_")


def step_to_json(step: Step) -> str:
    """One journal line's payload."""
    pending = getattr(step, "notification", None)
    notification = pending.to_json() if pending is not None else None
    if isinstance(step, Logout):
        record = step.record.to_json()
        return json.dumps(
            {
                "logout": record,
                "phoneUser": step.record.phone.phone_user,
                "notification": notification,
                "observe": step.observe,
                "generation": step.generation,
                "keysGiven": step.keys_given,
            }
        )
    if isinstance(step, RecordDecision):
        phone = asdict(step.phone) if step.phone else None
        return json.dumps({"decision": step.to_json(), "phone": phone, "notification": notification})
    payload = asdict(step)  # a RecordRestriction's restriction is a dict of plain values (its kind a str)
    payload["step"] = type(step).__name__
    payload["notification"] = notification
    return json.dumps(payload)


def step_from_json(text: str) -> Step:
    data = json.loads(text)
    raw = data.get("notification")
    notification = Notification.from_json(raw) if raw else None
    if "logout" in data:
        return Logout(
            ClosureRecord.from_json(data["logout"], data["phoneUser"]),
            notification,
            data.get("observe", False),
            data.get("generation"),
            data.get("keysGiven", False),
        )
    if "decision" in data:
        decision = data["decision"]
        return RecordDecision(
            decision["decisionId"],
            decision["decision"],
            datetime.fromisoformat(decision["decidedAt"]),
            PhoneRef(**data["phone"]) if data["phone"] else None,
            decision["detail"],
            notification,
        )
    phone = PhoneRef(**data["phone"])
    kind = data["step"]
    if kind == "IncrementCounter":
        return IncrementCounter(phone, CounterKind(data["kind"]), notification)
    if kind == "ResetCounters":
        return ResetCounters(phone, notification)
    if kind == "RecordRestriction":
        raw_restriction = data["restriction"]
        restriction = Restriction(**(raw_restriction | {"kind": RestrictionKind(raw_restriction["kind"])}))
        return RecordRestriction(phone, restriction, notification)
    if kind == "DeleteKeys":
        return DeleteKeys(phone, KeyScope(data["scope"]), tuple(data["key_prefixes"]), data.get("observe", False))
    raise ValueError(f"unknown journal step {kind!r}")


_NUMBER = re.compile(r"\d{7,}")


def without_numbers(text: str) -> str:
    """Log text with every run of 7 or more digits (a phone number, a peer's number in a key name) masked."""
    return _NUMBER.sub("<number>", text)
