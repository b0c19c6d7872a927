"""The runtime's outbound port: what it tells the rest of the sidecar (logs, metrics, traces) as things happen.

Observers are called synchronously from the runtime and must not block: anything slow is queued by them.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.rules.classification import ErrorClass
from sidecar.rules.policy import Counters, ErrorStats, Heal
from sidecar.rules.records import ClosureRecord, PhoneRef, RecordDecision


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
