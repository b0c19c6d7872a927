"""What the runtime tells the rest of the sidecar (logs, metrics, traces, webhooks) as things happen.

Observers are called synchronously from the runtime and must not block: anything slow is queued by them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from sidecar.classification import ErrorClass
from sidecar.policy import Counters, ErrorStats, Heal
from sidecar.records import ClosureRecord, PhoneRef, RecordDecision


class RuntimeObserver(Protocol):
    def decrypt_error(self, phone: PhoneRef, error_class: ErrorClass) -> None: ...

    def counters_changed(self, phone: PhoneRef, counters: Counters) -> None: ...

    def health_changed(self, phone: PhoneRef, stats: ErrorStats) -> None: ...

    def connection_changed(self, phone: PhoneRef, connected: bool) -> None: ...

    def healed(
        self,
        phone: PhoneRef,
        heal: Heal,
        keys_deleted: int | None,
        database: str,
        socket: str,
        duration: float,
    ) -> None: ...

    def heal_coalesced(self, phone: PhoneRef, heal: Heal) -> None: ...

    def closing(self, record: ClosureRecord) -> None: ...

    def closed(self, record: ClosureRecord) -> None: ...

    def forgotten(self, phone: PhoneRef) -> None: ...

    def decided(self, decision: RecordDecision) -> None: ...


class BaseObserver:
    """Does nothing for every notification; observers override what they care about."""

    def decrypt_error(self, phone: PhoneRef, error_class: ErrorClass) -> None:
        return None

    def counters_changed(self, phone: PhoneRef, counters: Counters) -> None:
        return None

    def health_changed(self, phone: PhoneRef, stats: ErrorStats) -> None:
        return None

    def connection_changed(self, phone: PhoneRef, connected: bool) -> None:
        return None

    def healed(
        self,
        phone: PhoneRef,
        heal: Heal,
        keys_deleted: int | None,
        database: str,
        socket: str,
        duration: float,
    ) -> None:
        return None

    def heal_coalesced(self, phone: PhoneRef, heal: Heal) -> None:
        return None

    def closing(self, record: ClosureRecord) -> None:
        return None

    def closed(self, record: ClosureRecord) -> None:
        return None

    def forgotten(self, phone: PhoneRef) -> None:
        return None

    def decided(self, decision: RecordDecision) -> None:
        return None


class ActionLog(BaseObserver):
    """One structured log line per action (heal, close, health change), never with the phone number."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("sidecar.actions")

    def health_changed(self, phone: PhoneRef, stats: ErrorStats) -> None:
        self._log.warning(
            "session health changed",
            extra={"fields": {"action": "health", **_ids(phone), "stats": dict(stats)}},
        )

    def healed(
        self,
        phone: PhoneRef,
        heal: Heal,
        keys_deleted: int | None,
        database: str,
        socket: str,
        duration: float,
    ) -> None:
        self._log.info(
            "session healed",
            extra={
                "fields": {
                    "action": "heal",
                    **_ids(phone),
                    "scope": str(heal.scope),
                    "keyPrefixes": list(heal.key_prefixes),
                    "keysDeleted": keys_deleted,
                    "database": database,
                    "socket": socket,
                    "durationSeconds": round(duration, 6),
                }
            },
        )

    def closed(self, record: ClosureRecord) -> None:
        self._log.warning("session closed", extra={"fields": {"action": "close", **record.to_json()}})

    def decided(self, decision: RecordDecision) -> None:
        self._log.warning(
            f"safety decision: {decision.decision}", extra={"fields": {"action": "decision", **decision.to_json()}}
        )


class ClosureLogFile(BaseObserver):
    """Appends every closure as one JSON line to its own file (the seed's 'log every close separately')."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path

    def closed(self, record: ClosureRecord) -> None:
        self._append(record.to_json())

    def decided(self, decision: RecordDecision) -> None:
        """Breaker decisions, held sessions and incidents go to the same log, marked by `decision`."""
        self._append(decision.to_json())

    def _append(self, line: dict[str, object]) -> None:
        with self._path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, separators=(",", ":")) + "\n")


def _ids(phone: PhoneRef) -> dict[str, int]:
    return {"organizationId": phone.organization_id, "organizationPhoneId": phone.organization_phone_id}
