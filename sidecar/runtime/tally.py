"""Per-batch counting of the errors that cannot change a decision.

Most of a storm is errors of classes the rules only count (no session record, media, app-state sync failures
that do not count toward Bad Decrypt, ...). Applying them one by one costs a classification, the observers and a
registry write per event; a batch does that once per phone, and once per class and organization, instead: `add`
classifies an error (cached by its text and source) and, when it changes no counter, keeps it in the batch's
tally; `flush(phone)` applies what the tally holds for one phone, and the caller does that before anything else
of that phone is applied, so every session sees its events in arrival order. What the tally applies is what
one-by-one application would have: the session made known with the time of its last error (unless it is
closed), the metrics incremented by the batch's totals (at its end), nothing else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.events.schema import DecryptError
from sidecar.rules.app_state import AppStateKind, app_state_signal, collection_label
from sidecar.rules.classification import ErrorClass, ErrorSource, classify
from sidecar.rules.inputs import phone_ref
from sidecar.runtime.observer import ErrorTotals, RuntimeObserver
from sidecar.runtime.registry import SessionRegistry

COUNTED = frozenset({ErrorClass.BAD_MAC, ErrorClass.BAD_DECRYPT})
APP_STATE_CLASSES = frozenset({ErrorClass.BAD_DECRYPT, ErrorClass.APP_STATE_SYNC})
CACHE_LIMIT = 4096  # distinct (error text, source) pairs remembered; error texts repeat in a storm


@dataclass(frozen=True, slots=True)
class Classified:
    error_class: ErrorClass
    app_state: AppStateKind | None  # the app-state signal the text shows, for the app-state classes
    tallied: bool  # a class that changes no counter: a batch tallies it


class Classifier:
    """`classify` with a bounded memo: the rules are pure, so the same text and source give the same class."""

    def __init__(self, limit: int = CACHE_LIMIT) -> None:
        self._known: dict[tuple[str, ErrorSource | None], Classified] = {}
        self._limit = limit

    def __call__(self, error: str, source: ErrorSource | None) -> Classified:
        key = (error, source)
        known = self._known.get(key)
        if known is None:
            error_class = classify(error, source)
            signal = app_state_signal(error) if error_class in APP_STATE_CLASSES else None
            known = Classified(error_class, signal.kind if signal is not None else None, error_class not in COUNTED)
            if len(self._known) >= self._limit:
                self._known.clear()
            self._known[key] = known
        return known


class ErrorTally:
    """The counted-only errors of one batch, until they are flushed: totals per class and organization (the
    observers get them once per batch), and per phone the fact that it had an error (the session made known,
    with the time of its last error)."""

    def __init__(
        self,
        classifier: Classifier,
        observers: Sequence[RuntimeObserver],
        registry: SessionRegistry,
        now: Callable[[], float],
    ) -> None:
        self._classify = classifier
        self._observers = observers
        self._registry = registry
        self._now = now
        self._at: float | None = None
        self._by_class: list[tuple[ErrorClass, int]] = []  # counted at the end, in C (Counter of a list)
        self._app_state: list[tuple[str, AppStateKind]] = []
        self._phones: dict[int, tuple[int, str]] = {}

    def add(self, report: DecryptError) -> bool:
        """Keep a counted-only error in the tally (True); False for one that must be decided on its own."""
        classified = self._classify(report.error, report.source)
        if not classified.tallied:
            return False
        self._by_class.append((classified.error_class, report.organization_id))
        if classified.app_state is not None:
            self._app_state.append((collection_label(report.collection), classified.app_state))
        self._phones[report.organization_phone_id] = (report.organization_id, report.phone_jid)
        return True

    def flush(self, organization_phone_id: int) -> None:
        """Apply the tally of one phone, before anything else of that phone is applied."""
        seen = self._phones.pop(organization_phone_id, None)
        if seen is not None:
            self._seen(organization_phone_id, *seen)

    def flush_all(self) -> None:
        phones, self._phones = self._phones, {}
        for organization_phone_id, seen in phones.items():
            self._seen(organization_phone_id, *seen)
        if self._by_class:
            totals = ErrorTotals(Counter(self._by_class), Counter(self._app_state))
            self._by_class, self._app_state = [], []
            for observer in self._observers:
                observer.errors_tallied(totals)

    def _seen(self, organization_phone_id: int, organization_id: int, phone_jid: str) -> None:
        """The session is now known and has a last error (a closed one stays closed)."""
        if self._at is None:
            self._at = self._now()
        if self._registry.is_closed(organization_phone_id):
            return
        session = self._registry.get(organization_phone_id)
        if session is None or session.phone.phone_user is None:
            session = self._registry.ensure(phone_ref(organization_id, organization_phone_id, phone_jid))
        session.last_error_at = self._at
