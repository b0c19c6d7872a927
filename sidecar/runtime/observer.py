"""The runtime's outbound port: what it tells the rest of the sidecar (logs, metrics, traces) as things happen.

Observers are called synchronously from the runtime and must not block: anything slow is queued by them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.rules.app_state import AppStateKind
from sidecar.rules.classification import ErrorClass
from sidecar.rules.policy import Counters, ErrorStats, Heal
from sidecar.rules.records import ClosureRecord, PhoneRef, RecordDecision
from sidecar.rules.restrictions import Restriction

log = logging.getLogger("sidecar.runtime.observer")


@dataclass(frozen=True, slots=True)
class ErrorTotals:
    """One batch's errors that change no decision, tallied (runtime/tally.py): counts per (class, organization)
    and app-state sync failures per (collection, kind), and failed messages (a `messageId`) per (organization,
    outcome: rules/loss.py Outcome). Their sessions were told apart already."""

    by_class: Mapping[tuple[ErrorClass, int], int]
    app_state: Mapping[tuple[str, AppStateKind], int]
    undecryptable: Mapping[tuple[int, str], int] = field(default_factory=dict)


class RuntimeObserver:
    """What the runtime tells its observers, declared once. Every method does nothing here: an observer
    subclasses this and overrides what it cares about; IsolatedObservers fans each one out."""

    def decrypt_error(self, phone: PhoneRef, error_class: ErrorClass) -> None:
        return None

    def errors_tallied(self, totals: ErrorTotals) -> None:
        return None

    def app_state_failure(self, phone: PhoneRef, collection: str, kind: AppStateKind) -> None:
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

    def message_undecryptable(self, phone: PhoneRef, outcome: str) -> None:
        """A message failed to decrypt (`outcome`: pending, or unknown when beyond the session's bound)."""
        return None

    def message_recovered(self, phone: PhoneRef, via: str, known: bool) -> None:
        """A failed message arrived after all (`known`: its failure was pending here)."""
        return None

    def messages_lost(self, phone: PhoneRef, count: int) -> None:
        """Failed messages whose --loss-deadline passed unrecovered."""
        return None

    def restriction_changed(self, phone: PhoneRef, restriction: Restriction, change: str) -> None:
        """A restriction started, was updated or lifted here (`change`: rules/restrictions.py's Change)."""
        return None


class IsolatedObservers(RuntimeObserver):
    """Fans each notification out to every observer; one that raises is logged and reported (`on_failure`
    with its class name) and neither the others nor the transition that notified are affected. Its methods are
    RuntimeObserver's own, each made a fan-out below (one list of methods, not a second copy of it)."""

    def __init__(self, observers: Sequence[RuntimeObserver], on_failure: Callable[[str], None] | None = None) -> None:
        self._observers = list(observers)
        self.on_failure = on_failure

    def _each(self, method: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                name = type(observer).__name__
                log.error("observer %s failed on %s; the transition goes on", name, method, exc_info=True)
                if self.on_failure is not None:
                    self.on_failure(name)


OBSERVER_METHODS = tuple(name for name, value in vars(RuntimeObserver).items() if callable(value) and name[0] != "_")


def _fan_out(name: str) -> Callable[..., None]:
    def method(self: IsolatedObservers, *args: Any) -> None:
        self._each(name, *args)

    method.__name__ = method.__qualname__ = name
    return method


for _name in OBSERVER_METHODS:
    setattr(IsolatedObservers, _name, _fan_out(_name))
