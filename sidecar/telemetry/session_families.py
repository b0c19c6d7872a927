"""Per-session gauge families, rendered at scrape time straight from the runtime's sessions.

Stock gauges format every sample through the generic exposition code on each scrape (about 500 ms for 10k
sessions x 5 series here), which stalls the event loop that serves the runtime link. Here each session's label
text is escaped and built once and cached; a scrape only formats numbers, and yields to the event loop every
CHUNK sessions so event processing is never blocked for more than a few milliseconds. The text is valid in
both the Prometheus text format and OpenMetrics (gauge lines are the same in both).

Which sessions get series (`--session-metrics`): `all` (every tracked session), `active` (the default: the
sessions with something to say, telemetry/exported.py, kept for `window` seconds after they last had; an
alert's series never disappears while the condition behind it holds), or `none`. The selection is a scan of the
sessions at scrape time, in chunks with yields like the rendering; the fleet families
(`whatsapp_sidecar_sessions_exported`, `whatsapp_sidecar_connected_sessions`) come from the same scan and are
complete in every mode.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass

from sidecar.rules.liveness import Status
from sidecar.rules.policy import ZERO, Counters, Limits, Phase, SessionState, is_healthy
from sidecar.rules.records import PhoneRef
from sidecar.runtime import SessionView
from sidecar.runtime.observer import RuntimeObserver
from sidecar.telemetry.exported import DEFAULT_WINDOW_SECONDS, SessionMetrics, exported_until, in_trouble

CHUNK = 500
SELECT_CHUNK = 5_000  # sessions looked at between yields while selecting (about 3 ms here)
DEFAULT_TEAM = "unassigned"

FAMILIES = (
    ("whatsapp_session_bad_mac_errors", "Current Bad MAC counter of the session"),
    ("whatsapp_session_bad_decrypt_errors", "Current app-state bad decrypt counter of the session"),
    ("whatsapp_session_healthy", "1 while isHealthy is true (no counter one short of its limit)"),
    ("whatsapp_session_connected", "1 while the runtime reports the connection open"),
    ("whatsapp_session_last_error_timestamp_seconds", "Time of the session's last decryption error"),
    ("whatsapp_session_last_inbound_timestamp_seconds", "Time of the last inbound stanza the runtime reported"),
)
FLEET_FAMILIES = (  # (name, labels, help): complete in every mode
    ("whatsapp_sidecar_sessions_exported", (), "Per-session series sets this scrape exports (--session-metrics)"),
    ("whatsapp_sidecar_connected_sessions", ("organization_id",), "Sessions the runtime reports connected"),
)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


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

    def reset_labels(self) -> None:
        """After the team mapping changed: labels are rebuilt on the next scrape."""
        self._labels.clear()

    @property
    def cached_labels(self) -> int:
        return len(self._labels)

    async def render(
        self,
        sessions: Iterable[SessionView],
        counters_of: Callable[[SessionView], Counters] | None = None,
        last_inbound_of: Callable[[int], float | None] = lambda _: None,
        troubled: Mapping[int, Status] | None = None,
    ) -> AsyncIterator[bytes]:
        """The fleet families of the sessions, then the per-session families of the selected ones, as chunks of
        text, yielding to the event loop between chunks. `counters_of`: the counters to show (the windowed
        policy's current ones); the stored ones by default. `last_inbound_of`: the liveness watch's time of a
        session's last inbound stanza; `troubled`: the liveness statuses of the sessions found suspect or deaf."""
        views = list(sessions)  # the dict may change while we yield
        snapshot: list[SessionView] = views if counters_of is None else [_Shown(v, counters_of(v)) for v in views]
        selected, connected = await self._select(snapshot, troubled or {})
        yield self._fleet_text(len(selected), connected)
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

    async def _select(
        self, snapshot: list[SessionView], troubled: Mapping[int, Status]
    ) -> tuple[list[SessionView], Counter[int]]:
        """The sessions to export under the mode, and the connected sessions by organization (of all of them).
        Each chunk is filtered by comprehensions first (the quiet sessions cost no call); the few left are judged
        by telemetry/exported.py."""
        connected: Counter[int] = Counter()
        selected: list[SessionView] = []
        now, window, limits, until = self._now(), self.window, self._limits, self._until
        active = self.mode is SessionMetrics.ACTIVE
        quiet_at_zero = not in_trouble(ZERO, limits, Phase.ACTIVE, None)  # what the filter below assumes
        named = set(troubled) | set(until)  # few: judged whatever their state
        steady = Phase.ACTIVE
        for start in range(0, len(snapshot), SELECT_CHUNK):
            chunk = snapshot[start : start + SELECT_CHUNK]
            connected.update([view.phone.organization_id for view in chunk if view.connected])
            if active:
                candidates = chunk if not quiet_at_zero else [
                    view for view in chunk
                    if view.last_error_at is not None or view.state.counters is not ZERO
                    or view.state.phase is not steady or view.phone.organization_phone_id in named
                ]  # fmt: skip
                for view in candidates:
                    phone_id = view.phone.organization_phone_id
                    trouble = in_trouble(view.counters, limits, view.phase, troubled.get(phone_id))
                    kept = until.get(phone_id)
                    ends = exported_until(trouble, view.last_error_at, kept, now, window)
                    if ends is not None:
                        selected.append(view)
                        if trouble or kept is not None:
                            until[phone_id] = ends
                    elif kept is not None:
                        del until[phone_id]
            if start + SELECT_CHUNK < len(snapshot):
                await asyncio.sleep(0)
        return (snapshot if self.mode is SessionMetrics.ALL else selected), connected

    def _fleet_text(self, exported: int, connected: Counter[int]) -> bytes:
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
