"""The action log (one structured line per heal, close, health change and safety decision) and the closure
log file (one JSON line per closure or decision), both runtime observers."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from sidecar.rules.policy import ErrorStats, Heal
from sidecar.rules.records import ClosureRecord, PhoneRef, RecordDecision
from sidecar.rules.restrictions import Restriction
from sidecar.runtime.observer import RuntimeObserver


class ActionLog(RuntimeObserver):
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
                    # The prefixes name the failing peer's number: only their count reaches the log.
                    "keyPrefixCount": len(heal.key_prefixes),
                    "keysDeleted": keys_deleted,
                    "database": database,
                    "socket": socket,
                    "durationSeconds": round(duration, 6),
                }
            },
        )

    def closed(self, record: ClosureRecord) -> None:
        self._log.warning("session closed", extra={"fields": {"action": "close", **record.to_json()}})

    def restriction_changed(self, phone: PhoneRef, restriction: Restriction, change: str) -> None:
        """The detail is WhatsApp's text and may name a number: only its presence reaches the log."""
        fields = {"action": "restriction", **_ids(phone), "kind": str(restriction.kind), "change": change,
                  "until": restriction.until, "code": restriction.code}  # fmt: skip
        self._log.warning(f"session restriction {change}", extra={"fields": fields})

    def decided(self, decision: RecordDecision) -> None:
        self._log.warning(
            f"safety decision: {decision.decision}", extra={"fields": {"action": "decision", **decision.to_json()}}
        )


class ClosureLogFile(RuntimeObserver):
    """Appends every closure as one JSON line to its own file (the seed's 'log every close separately').

    Writes happen on one worker thread, in order, never on the event loop (a slow disk must not stall event
    processing); `close()` waits for the last of them."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="closure-log")
        self._handle: TextIO | None = None

    def closed(self, record: ClosureRecord) -> None:
        self._append(record.to_json())

    def decided(self, decision: RecordDecision) -> None:
        """Breaker decisions, held sessions and incidents go to the same log, marked by `decision`."""
        self._append(decision.to_json())

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _append(self, line: dict[str, object]) -> None:
        self._writer.submit(self._write, json.dumps(line, separators=(",", ":")) + "\n")

    def _write(self, text: str) -> None:
        try:
            if self._handle is None:
                self._handle = self._path.open("a", encoding="utf-8")
            self._handle.write(text)
            self._handle.flush()
        except OSError:
            logging.getLogger("sidecar.actions").exception("cannot append to the closure log %s", self._path)


def _ids(phone: PhoneRef) -> dict[str, int]:
    return {"organizationId": phone.organization_id, "organizationPhoneId": phone.organization_phone_id}
