"""The session registry: the decision state the rules read and write (each live session's counters and phase,
whether its runtime reports it connected, its last error), and the markers of phones the sidecar closed and
logged out. `SessionRegistry` is the port; `MemorySessionRegistry` is the single-process implementation.

Adapters never get a `Session`: they read `SessionView`, whose fields are read-only properties (a structural,
zero-copy view, so a scrape of 10,000 sessions builds no copies).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from sidecar.ports import StoredSession
from sidecar.rules.policy import ZERO, Counters, Phase, SessionState
from sidecar.rules.records import PhoneRef


class SessionView(Protocol):
    """What adapters may read of a session."""

    @property
    def phone(self) -> PhoneRef: ...

    @property
    def organization_phone_id(self) -> int: ...

    @property
    def phase(self) -> Phase: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def state(self) -> SessionState:
        """The decision state (its counters and phase) in one read."""
        ...

    @property
    def connected(self) -> bool: ...

    @property
    def last_error_at(self) -> float | None: ...


class SessionIndex:
    """What the registry keeps current as sessions are written, so that readers need no scan of every session
    (a scrape of 100,000 sessions reads these instead): the sessions written with something to say since a
    reader last took them (counters, a phase other than active, an error), and the connected sessions by
    organization."""

    __slots__ = ("connected", "touched")

    def __init__(self) -> None:
        self.touched: set[int] = set()
        self.connected: Counter[int] = Counter()

    def connection(self, organization_id: int, delta: int) -> None:
        left = self.connected[organization_id] + delta
        if left > 0:
            self.connected[organization_id] = left
        else:
            del self.connected[organization_id]


def _of_note(state: SessionState) -> bool:
    return state.counters is not ZERO or state.phase is not Phase.ACTIVE


class Session:
    """A live session's decision state; only the runtime changes it. Its writes keep the registry's index."""

    __slots__ = ("_connected", "_index", "_last_error_at", "_state", "phone")

    def __init__(self, phone: PhoneRef, state: SessionState, index: SessionIndex) -> None:
        self.phone = phone
        self._index = index
        self._connected = False
        self._last_error_at: float | None = None
        self._state = state
        if _of_note(state):
            index.touched.add(phone.organization_phone_id)

    @property
    def state(self) -> SessionState:
        return self._state

    @state.setter
    def state(self, state: SessionState) -> None:
        self._state = state
        if _of_note(state):
            self._index.touched.add(self.phone.organization_phone_id)

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, connected: bool) -> None:
        if connected is not self._connected:
            self._connected = connected
            self._index.connection(self.phone.organization_id, 1 if connected else -1)

    @property
    def last_error_at(self) -> float | None:
        """Epoch seconds."""
        return self._last_error_at

    @last_error_at.setter
    def last_error_at(self, at: float | None) -> None:
        self._last_error_at = at
        if at is not None:
            self._index.touched.add(self.phone.organization_phone_id)

    @property
    def organization_phone_id(self) -> int:
        return self.phone.organization_phone_id

    @property
    def phase(self) -> Phase:
        return self._state.phase

    @property
    def counters(self) -> Counters:
        return self._state.counters

    def renamed(self, phone: PhoneRef) -> None:
        """The same phone under a fuller reference (its number learnt); a connected count moves with it."""
        if self._connected and phone.organization_id != self.phone.organization_id:
            self._index.connection(self.phone.organization_id, -1)
            self._index.connection(phone.organization_id, 1)
        self.phone = phone

    def detach(self) -> None:
        """Out of the registry (closed or forgotten): it leaves the index, and later writes to it touch none."""
        if self._connected:
            self._index.connection(self.phone.organization_id, -1)
        self._index.touched.discard(self.phone.organization_phone_id)
        self._index = SessionIndex()


@dataclass(frozen=True, slots=True)
class LoggedOut:
    """When the sidecar logged a phone out, and whether only in observe mode (nothing was really ended)."""

    at: float
    observed: bool


class SessionRegistry(Protocol):
    """Live sessions, and phones closed by the sidecar and not opened since (their errors change nothing)."""

    def get(self, organization_phone_id: int) -> Session | None: ...

    def ensure(self, phone: PhoneRef) -> Session:
        """The phone's session, created empty on first sight."""

    def sessions(self) -> Iterator[Session]: ...

    def close_out(self, session: Session, logged_out: LoggedOut) -> None:
        """The close finished: forget the session and mark the phone closed (and when it was logged out)."""

    def reopen(self, organization_phone_id: int) -> bool:
        """The phone reported `open`: drop its closed and logged-out markers. True if it was closed."""

    def closed_phone(self, organization_phone_id: int) -> PhoneRef | None: ...

    def closed_phones(self) -> Iterator[PhoneRef]:
        """The phones closed by the sidecar and not opened since (a QR re-scan each)."""
        ...

    def is_closed(self, organization_phone_id: int) -> bool: ...

    def logged_out(self, organization_phone_id: int) -> LoggedOut | None: ...

    def restore(self, stored: Iterable[StoredSession]) -> None:
        """Continue from stored counters; counts taken since this start are added to the stored ones."""

    def warm(self, stored: Iterable[StoredSession]) -> None:
        """Fleet mode: fill this replica's read cache with phones it has not decided on since it started."""

    def sweep(self, now: float, ttl: float) -> list[PhoneRef]:
        """Bounded state: forget sessions that hold nothing (active, zero counters, disconnected, no recent error)
        once they have been so for `ttl` seconds, and closed/logged-out markers older than `ttl`. Returns the
        sessions forgotten (their markers are not sessions)."""

    @property
    def session_count(self) -> int: ...

    @property
    def closed_count(self) -> int: ...

    def note_held(self) -> None:
        """A decision held a session (the breaker): held_count counts again."""
        ...

    @property
    def held_count(self) -> int: ...

    def take_touched(self) -> set[int]:
        """The sessions written with something to say (counters, a phase other than active, an error) since the
        last take; one reader (the scrape) takes them."""
        ...

    def connected_by_organization(self) -> Mapping[int, int]:
        """The connected sessions by organization, kept as connections change (a copy)."""
        ...


class MemorySessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[int, Session] = {}
        self._closed: dict[int, PhoneRef] = {}
        self._logged_out: dict[int, LoggedOut] = {}
        self._quiet_since: dict[int, float] = {}  # sweep bookkeeping: since when a session has held nothing
        self._closed_at: dict[int, float] = {}  # when each closed marker was set (first sweep, if unknown)
        self._maybe_held = False  # some session may be held (note_held); held_count scans only then
        self._index = SessionIndex()

    def get(self, organization_phone_id: int) -> Session | None:
        return self._sessions.get(organization_phone_id)

    def ensure(self, phone: PhoneRef) -> Session:
        session = self._sessions.get(phone.organization_phone_id)
        if session is None:
            session = Session(phone, SessionState(), self._index)
            self._sessions[phone.organization_phone_id] = session
        elif session.phone.phone_user is None and phone.phone_user:
            session.renamed(phone)
        return session

    def sessions(self) -> Iterator[Session]:
        return iter(self._sessions.values())

    def close_out(self, session: Session, logged_out: LoggedOut) -> None:
        self._logged_out[session.organization_phone_id] = logged_out
        if self._sessions.pop(session.organization_phone_id, None) is not None:
            session.detach()
        self._closed[session.organization_phone_id] = session.phone
        self._closed_at[session.organization_phone_id] = logged_out.at

    def reopen(self, organization_phone_id: int) -> bool:
        self._logged_out.pop(organization_phone_id, None)
        self._closed_at.pop(organization_phone_id, None)
        return self._closed.pop(organization_phone_id, None) is not None

    def closed_phone(self, organization_phone_id: int) -> PhoneRef | None:
        return self._closed.get(organization_phone_id)

    def closed_phones(self) -> Iterator[PhoneRef]:
        return iter(self._closed.values())

    def is_closed(self, organization_phone_id: int) -> bool:
        return organization_phone_id in self._closed

    def logged_out(self, organization_phone_id: int) -> LoggedOut | None:
        return self._logged_out.get(organization_phone_id)

    def restore(self, stored: Iterable[StoredSession]) -> None:
        for item in stored:
            phone_id = item.phone.organization_phone_id
            if item.closed:
                self._closed.setdefault(phone_id, item.phone)
                if item.closed_at is not None:
                    self._closed_at.setdefault(phone_id, item.closed_at)
                continue
            session = self._sessions.get(phone_id)
            if session is None:
                self._sessions[phone_id] = Session(item.phone, SessionState(item.counters), self._index)
            elif session.state.phase is Phase.ACTIVE:
                counters = replace(
                    session.state.counters,
                    bad_mac_errors=session.state.counters.bad_mac_errors + item.counters.bad_mac_errors,
                    bad_decrypt_errors=session.state.counters.bad_decrypt_errors + item.counters.bad_decrypt_errors,
                )
                session.state = replace(session.state, counters=counters)

    def warm(self, stored: Iterable[StoredSession]) -> None:
        for item in stored:
            phone_id = item.phone.organization_phone_id
            if phone_id in self._sessions or phone_id in self._closed:
                continue
            if item.closed:
                self._closed[phone_id] = item.phone
                if item.closed_at is not None:
                    self._closed_at[phone_id] = item.closed_at
            else:
                self._sessions[phone_id] = Session(item.phone, SessionState(item.counters), self._index)

    def sweep(self, now: float, ttl: float) -> list[PhoneRef]:
        cutoff = now - ttl
        forgotten: list[PhoneRef] = []
        for phone_id, session in list(self._sessions.items()):
            holds_nothing = (
                session.state.phase is Phase.ACTIVE
                and session.state.counters == Counters()
                and not session.connected
                and (session.last_error_at is None or session.last_error_at <= cutoff)
            )
            if not holds_nothing:
                self._quiet_since.pop(phone_id, None)
            elif self._quiet_since.setdefault(phone_id, now) <= cutoff:
                del self._sessions[phone_id]
                del self._quiet_since[phone_id]
                session.detach()
                forgotten.append(session.phone)
        for phone_id in [p for p in self._quiet_since if p not in self._sessions]:
            del self._quiet_since[phone_id]
        for phone_id in list(self._closed):
            if self._closed_at.setdefault(phone_id, now) <= cutoff:
                del self._closed[phone_id], self._closed_at[phone_id]
                self._logged_out.pop(phone_id, None)
        return forgotten

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def closed_count(self) -> int:
        return len(self._closed)

    def note_held(self) -> None:
        self._maybe_held = True

    @property
    def held_count(self) -> int:
        """Sessions the breaker holds. Read on every scrape: a scan only since a decision held one (only
        Effects.carry_out writes a held state, and tells the registry), until the scan finds none again."""
        if not self._maybe_held:
            return 0
        held = sum(1 for session in self._sessions.values() if session.state.phase is Phase.HELD)
        self._maybe_held = held > 0
        return held

    def take_touched(self) -> set[int]:
        touched, self._index.touched = self._index.touched, set()
        return touched

    def connected_by_organization(self) -> Mapping[int, int]:
        return dict(self._index.connected)
