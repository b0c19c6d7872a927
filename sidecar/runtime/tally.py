"""Per-batch counting of the errors that cannot change a decision, and of the opens that change nothing.

Most of a storm is errors of classes the rules only count (no session record, media, app-state sync failures
that do not count toward Bad Decrypt, ...). Applying them one by one costs a classification, the observers and a
registry write per event; a batch does that once per phone, and once per class and organization, instead: `add`
classifies an error (cached by its text and source) and, when it changes no counter, keeps it in the batch's
tally; `flush(phone)` applies what the tally holds for one phone, and the caller does that before anything else
of that phone is applied, so every session sees its events in arrival order. What the tally applies is what
one-by-one application would have: the session made known with the time of its last error (unless it is
closed), the metrics incremented by the batch's totals (at its end), nothing else.

A reconnect flood is mostly opens of sessions that are open already with nothing counted: the rules give back the
same state and no decision for them (an open is a clean slate), so `add_open` keeps them too when the decider says
an open of that session decides nothing (`steady`); what the tally applies for one is what the engine would: the
session's liveness watch restarted (rules/liveness.py `on_connection`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.events.schema import ConnectionUpdate, DecryptError, SessionEvent
from sidecar.rules.app_state import AppStateKind, app_state_signal, collection_label
from sidecar.rules.classification import ErrorClass, ErrorSource, classify
from sidecar.rules.inputs import phone_ref
from sidecar.rules.jid import bare_number
from sidecar.rules.records import PhoneRef
from sidecar.runtime.liveness_watch import LivenessWatch
from sidecar.runtime.observer import ErrorTotals, RuntimeObserver
from sidecar.runtime.registry import Session, SessionRegistry

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
    with the time of its last error); and the phones opened again with nothing to decide."""

    def __init__(
        self,
        classifier: Classifier,
        observers: Sequence[RuntimeObserver],
        registry: SessionRegistry,
        now: Callable[[], float],
        steady: Callable[[int], Session | None],
        liveness: LivenessWatch,
        messages_failed: Callable[[list[tuple[int, str]], dict[int, tuple[int, str]], float], Counter[tuple[int, str]]],
    ) -> None:
        self._classify = classifier
        self._observers = observers
        self._registry = registry
        self._now = now
        self._steady = steady
        self._liveness = liveness
        # failures with a messageId are pending for the loss tracker, taken at the flush (a phone's before anything
        # else of it is applied); their observers are told with the batch's totals
        self._messages_failed = messages_failed
        self._message_ids: list[tuple[int, str]] = []
        self._undecryptable: Counter[tuple[int, str]] = Counter()
        self._opened: dict[int, PhoneRef] = {}
        self._at: float | None = None
        self._by_class: list[tuple[ErrorClass, int]] = []  # counted at the end, in C (Counter of a list)
        self._app_state: list[tuple[str, AppStateKind]] = []
        self._phones: dict[int, tuple[int, str]] = {}

    def takes(self, event: SessionEvent) -> bool:
        """Keep the event in the tally (True), or leave it to be applied on its own (False)."""
        if type(event) is DecryptError:
            return self.add(event)
        if type(event) is ConnectionUpdate:
            return self.add_open(event)
        return False

    def add(self, report: DecryptError) -> bool:
        """Keep a counted-only error in the tally (True); False for one that must be decided on its own."""
        classified = self._classify(report.error, report.source)
        if not classified.tallied:
            return False
        if report.message_id is not None and report.source != "app-state":
            self._message_ids.append((report.organization_phone_id, report.message_id))
        self._by_class.append((classified.error_class, report.organization_id))
        if classified.app_state is not None:
            self._app_state.append((collection_label(report.collection), classified.app_state))
        self._phones[report.organization_phone_id] = (report.organization_id, report.phone_jid)
        return True

    def add_open(self, update: ConnectionUpdate) -> bool:
        """Keep an `open` that decides nothing (True): not a new login, of a session the decider calls steady,
        naming the phone the session already knows (the intake's events are validated: the bare cut is the
        number). False for one that must be applied on its own."""
        if update.connection != "open" or update.new_login:
            return False
        session = self._steady(update.organization_phone_id)
        if session is None:
            return False
        phone = session.phone
        if phone.organization_id != update.organization_id or phone.phone_user != bare_number(update.phone_jid):
            return False
        self._opened[update.organization_phone_id] = phone
        return True

    def flush(self, organization_phone_id: int) -> None:
        """Apply the tally of one phone, before anything else of that phone is applied."""
        seen = self._phones.get(organization_phone_id)
        if seen is not None:
            if self._message_ids:  # in order: this phone's ids may be pending before its next event
                self._track()
            del self._phones[organization_phone_id]
            self._seen(organization_phone_id, *seen)
        opened = self._opened.pop(organization_phone_id, None)
        if opened is not None:
            self._open(opened)

    def flush_all(self) -> None:
        if self._message_ids:
            self._track()
        phones, self._phones = self._phones, {}
        for organization_phone_id, seen in phones.items():
            self._seen(organization_phone_id, *seen)
        opened, self._opened = self._opened, {}
        for phone in opened.values():
            self._open(phone)
        if self._by_class:
            totals = ErrorTotals(Counter(self._by_class), Counter(self._app_state), self._undecryptable)
            self._by_class, self._app_state, self._undecryptable = [], [], Counter()
            for observer in self._observers:
                observer.errors_tallied(totals)

    def _track(self) -> None:
        failures, self._message_ids = self._message_ids, []
        self._undecryptable.update(self._messages_failed(failures, self._phones, self._batch_time()))

    def _open(self, phone: PhoneRef) -> None:
        """What the engine does for an open that decides nothing: the liveness watch starts again."""
        self._liveness.connection(phone, True, self._batch_time())

    def _batch_time(self) -> float:
        if self._at is None:
            self._at = self._now()
        return self._at

    def _seen(self, organization_phone_id: int, organization_id: int, phone_jid: str) -> None:
        """The session is now known and has a last error (a closed one stays closed)."""
        at = self._batch_time()
        if self._registry.is_closed(organization_phone_id):
            return
        session = self._registry.get(organization_phone_id)
        if session is None or session.phone.phone_user is None:
            session = self._registry.ensure(phone_ref(organization_id, organization_phone_id, phone_jid))
        session.last_error_at = at
