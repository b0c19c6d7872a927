"""Per-session gauge families, rendered at scrape time straight from the runtime's sessions.

Stock gauges format every sample through the generic exposition code on each scrape (about 500 ms for 10k
sessions x 5 series here), which stalls the event loop that serves the runtime link. Here each session's label
text is escaped and built once and cached; a scrape only formats numbers, and yields to the event loop every
CHUNK sessions so event processing is never blocked for more than a few milliseconds. The text is valid in
both the Prometheus text format and OpenMetrics (gauge lines are the same in both).

Which sessions get series (`--session-metrics`): `all` (every tracked session), `active` (the default: the
sessions with something to say, telemetry/exported.py, kept for `window` seconds after they last had; an
alert's series never disappears while the condition behind it holds), or `none`. `active` judges only the
sessions that may have something to say (the registry's index of sessions written with counters, a phase or an
error, and the ones it exported before), so a scrape costs nothing per idle session; the fleet families
(`whatsapp_sidecar_sessions_exported`, `whatsapp_sidecar_connected_sessions`, the latter kept by the registry as
connections change) are complete in every mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from sidecar.rules.liveness import Status
from sidecar.rules.policy import ZERO, Counters, Limits, Phase, SessionState, is_healthy
from sidecar.rules.records import PhoneRef
from sidecar.rules.restrictions import Restriction
from sidecar.runtime import SessionView
from sidecar.runtime.observer import RuntimeObserver
from sidecar.telemetry.exported import DEFAULT_WINDOW_SECONDS, SessionMetrics, exported_until, in_trouble

CHUNK = 500
SELECT_CHUNK = 1_000  # sessions judged between yields while selecting (about 2 ms here)
DEFAULT_TEAM = "unassigned"

FAMILIES = (
    ("whatsapp_session_bad_mac_errors", "Current Bad MAC counter of the session"),
    ("whatsapp_session_bad_decrypt_errors", "Current app-state bad decrypt counter of the session"),
    ("whatsapp_session_healthy", "1 while isHealthy is true (no counter one short of its limit)"),
    ("whatsapp_session_connected", "1 while the runtime reports the connection open"),
    ("whatsapp_session_last_error_timestamp_seconds", "Time of the session's last decryption error"),
    ("whatsapp_session_last_inbound_timestamp_seconds", "Time of the last inbound stanza the runtime reported"),
)
RESTRICTED = ("whatsapp_session_restricted", "1 while WhatsApp restricts the number (account.restriction), by kind")
LOST = (
    "whatsapp_session_messages_lost",
    "Messages of the session that failed to decrypt and were not recovered within --loss-deadline",
)
FLEET_FAMILIES = (  # (name, labels, help): complete in every mode
    ("whatsapp_sidecar_sessions_exported", (), "Per-session series sets this scrape exports (--session-metrics)"),
    ("whatsapp_sidecar_connected_sessions", ("organization_id",), "Sessions the runtime reports connected"),
)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class SessionSource(Protocol):
    """What a scrape reads of the runtime's sessions."""

    def sessions(self) -> Iterator[SessionView]: ...

    def session(self, organization_phone_id: int) -> SessionView | None: ...

    def take_touched(self) -> set[int]: ...

    def connected_by_organization(self) -> Mapping[int, int]: ...

    def restricted(self) -> list[tuple[PhoneRef, Restriction]]: ...

    def losing(self) -> list[tuple[PhoneRef, int]]: ...


class SessionFamilies(RuntimeObserver):
    def __init__(
        self,
        limits: Limits,
        team_of: Callable[[int, int], str],
        now: Callable[[], float],
        mode: SessionMetrics = SessionMetrics.ACTIVE,
        window: float = DEFAULT_WINDOW_SECONDS,
    ) -> None:
        self._limits = limits
        self._team_of = team_of
        self._now = now
        self.mode = mode
        self.window = window
        self._labels: dict[int, str] = {}
        self._until: dict[int, float] = {}  # active mode: exported until then (the window after it last had news)
        self._tracked: set[int] = set()  # active mode: the sessions judged at each scrape until they are quiet

    def labels(self, phone: PhoneRef) -> str:
        cached = self._labels.get(phone.organization_phone_id)
        if cached is None:
            team = escape_label_value(self._team_of(phone.organization_id, phone.organization_phone_id))
            cached = (
                f'{{organization_id="{phone.organization_id}",'
                f'organization_phone_id="{phone.organization_phone_id}",team="{team}"}}'
            )
            self._labels[phone.organization_phone_id] = cached
        return cached

    def forgotten(self, phone: PhoneRef) -> None:
        """A closed session's series disappear from the next scrape (no unbounded growth)."""
        self._labels.pop(phone.organization_phone_id, None)
        self._until.pop(phone.organization_phone_id, None)
        self._tracked.discard(phone.organization_phone_id)

    def reset_labels(self) -> None:
        """After the team mapping changed: labels are rebuilt on the next scrape."""
        self._labels.clear()

    @property
    def cached_labels(self) -> int:
        return len(self._labels)

    async def render(
        self,
        source: SessionSource,
        counters_of: Callable[[SessionView], Counters] | None = None,
        last_inbound_of: Callable[[int], float | None] = lambda _: None,
        troubled: Mapping[int, Status] | None = None,
    ) -> AsyncIterator[bytes]:
        """The fleet families, then the per-session families of the selected sessions, as chunks of text,
        yielding to the event loop between chunks. `counters_of`: the counters to show (the windowed policy's
        current ones); the stored ones by default. `last_inbound_of`: the liveness watch's time of a session's
        last inbound stanza; `troubled`: the liveness statuses of the sessions found suspect or deaf."""
        selected = await self._select(source, counters_of, troubled or {})
        yield self._fleet_text(len(selected), source.connected_by_organization())
        if self.mode is SessionMetrics.NONE:
            return
        limits, labels = self._limits, self.labels
        for name, help_text in FAMILIES:
            yield f"# HELP {name} {help_text}\n# TYPE {name} gauge\n".encode()
            for start in range(0, len(selected), CHUNK):
                chunk = selected[start : start + CHUNK]
                if name == "whatsapp_session_bad_mac_errors":
                    lines = [f"{name}{labels(s.phone)} {s.counters.bad_mac_errors}\n" for s in chunk]
                elif name == "whatsapp_session_bad_decrypt_errors":
                    lines = [f"{name}{labels(s.phone)} {s.counters.bad_decrypt_errors}\n" for s in chunk]
                elif name == "whatsapp_session_healthy":
                    lines = [f"{name}{labels(s.phone)} {int(is_healthy(s.counters, limits))}\n" for s in chunk]
                elif name == "whatsapp_session_connected":
                    lines = [f"{name}{labels(s.phone)} {int(s.connected)}\n" for s in chunk]
                elif name == "whatsapp_session_last_error_timestamp_seconds":
                    lines = [f"{name}{labels(s.phone)} {s.last_error_at}\n" for s in chunk if s.last_error_at]
                else:
                    inbound = [(s.phone, last_inbound_of(s.phone.organization_phone_id)) for s in chunk]
                    lines = [f"{name}{labels(phone)} {at}\n" for phone, at in inbound if at is not None]
                yield "".join(lines).encode()
                await asyncio.sleep(0)  # writes rarely wait, so yield to event processing here
        yield self._restricted_text(source.restricted())
        yield self._lost_text(source.losing())

    async def _select(
        self,
        source: SessionSource,
        counters_of: Callable[[SessionView], Counters] | None,
        troubled: Mapping[int, Status],
    ) -> list[SessionView]:
        """The sessions to export under the mode, as they are now (the registry may change while we yield).
        `all` copies every session's view; `active` judges only the sessions that may have something to say: the
        ones written with something since the last scrape (the registry's index), the ones exported or judged
        before and not let go yet, and the troubled ones. Nothing here grows with idle sessions."""
        touched = source.take_touched()  # taken in every mode, so the registry's set stays small
        if self.mode is SessionMetrics.ALL:
            views = list(source.sessions())
            return views if counters_of is None else [_Shown(v, counters_of(v)) for v in views]
        if self.mode is SessionMetrics.NONE:
            return []
        self._tracked |= touched
        now, window, limits, until, tracked = self._now(), self.window, self._limits, self._until, self._tracked
        tracked |= troubled.keys()
        if in_trouble(ZERO, limits, Phase.ACTIVE, None):  # limits of 1: every session is one short of one
            tracked |= {view.organization_phone_id for view in source.sessions()}
        selected: list[SessionView] = []
        for count, phone_id in enumerate(sorted(tracked), 1):
            view = source.session(phone_id)
            if view is None:  # closed or forgotten since
                tracked.discard(phone_id)
                until.pop(phone_id, None)
                continue
            shown = view if counters_of is None else _Shown(view, counters_of(view))
            trouble = in_trouble(shown.counters, limits, shown.phase, troubled.get(phone_id))
            kept = until.get(phone_id)
            ends = exported_until(trouble, shown.last_error_at, kept, now, window)
            if ends is not None:
                selected.append(shown)
                if trouble or kept is not None:
                    until[phone_id] = ends
            else:  # nothing to say any more: judged again only once written with something
                tracked.discard(phone_id)
                until.pop(phone_id, None)
            if count % SELECT_CHUNK == 0:
                await asyncio.sleep(0)
        return selected

    def _restricted_text(self, restricted: list[tuple[PhoneRef, Restriction]]) -> bytes:
        """Every restricted session, in every mode but `none` (restrictions are few, and each is news)."""
        name, help_text = RESTRICTED
        lines = [f"# HELP {name} {help_text}\n# TYPE {name} gauge\n"]
        lines += [f'{name}{self.labels(phone)[:-1]},kind="{r.kind}"}} 1\n' for phone, r in restricted]
        return "".join(lines).encode()

    def _lost_text(self, losing: list[tuple[PhoneRef, int]]) -> bytes:
        """Every session that lost messages, in every mode but `none` (a loss is news)."""
        name, help_text = LOST
        lines = [f"# HELP {name} {help_text}\n# TYPE {name} gauge\n"]
        lines += [f"{name}{self.labels(phone)} {count}\n" for phone, count in losing]
        return "".join(lines).encode()

    def _fleet_text(self, exported: int, connected: Mapping[int, int]) -> bytes:
        (exported_name, _, exported_help), (connected_name, _, connected_help) = FLEET_FAMILIES
        lines = [
            f"# HELP {exported_name} {exported_help}\n# TYPE {exported_name} gauge\n{exported_name} {exported}\n",
            f"# HELP {connected_name} {connected_help}\n# TYPE {connected_name} gauge\n",
        ]
        lines += [f'{connected_name}{{organization_id="{o}"}} {n}\n' for o, n in sorted(connected.items())]
        return "".join(lines).encode()


@dataclass(frozen=True, slots=True)
class _Shown:
    """A session as rendered: its view with the counters to show."""

    view: SessionView
    counters: Counters

    @property
    def phone(self) -> PhoneRef:
        return self.view.phone

    @property
    def connected(self) -> bool:
        return self.view.connected

    @property
    def last_error_at(self) -> float | None:
        return self.view.last_error_at

    @property
    def phase(self) -> Phase:
        return self.view.phase

    @property
    def state(self) -> SessionState:
        return SessionState(self.counters, self.view.phase)

    @property
    def organization_phone_id(self) -> int:
        return self.view.organization_phone_id
