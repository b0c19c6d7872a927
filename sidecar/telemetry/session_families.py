"""Per-session gauge families, rendered at scrape time straight from the runtime's sessions.

Stock gauges format every sample through the generic exposition code on each scrape (about 500 ms for 10k
sessions x 5 series here), which stalls the event loop that serves the runtime link. Here each session's label
text is escaped and built once and cached; a scrape only formats numbers, and yields to the event loop every
CHUNK sessions so event processing is never blocked for more than a few milliseconds. The text is valid in
both the Prometheus text format and OpenMetrics (gauge lines are the same in both).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from sidecar.rules.policy import Counters, Limits, is_healthy
from sidecar.rules.records import PhoneRef
from sidecar.runtime import SessionView
from sidecar.runtime.observer import RuntimeObserver

CHUNK = 500
DEFAULT_TEAM = "unassigned"

FAMILIES = (
    ("whatsapp_session_bad_mac_errors", "Current Bad MAC counter of the session"),
    ("whatsapp_session_bad_decrypt_errors", "Current app-state bad decrypt counter of the session"),
    ("whatsapp_session_healthy", "1 while isHealthy is true (no counter one short of its limit)"),
    ("whatsapp_session_connected", "1 while the runtime reports the connection open"),
    ("whatsapp_session_last_error_timestamp_seconds", "Time of the session's last decryption error"),
    ("whatsapp_session_last_inbound_timestamp_seconds", "Time of the last inbound stanza the runtime reported"),
)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class SessionFamilies(RuntimeObserver):
    def __init__(self, limits: Limits, team_of: Callable[[int, int], str]) -> None:
        self._limits = limits
        self._team_of = team_of
        self._labels: dict[int, str] = {}

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
    ) -> AsyncIterator[bytes]:
        """The six families as chunks of text, yielding to the event loop between chunks. `counters_of`: the
        counters to show (the windowed policy's current ones); the stored ones by default. `last_inbound_of`:
        the liveness watch's time of a session's last inbound stanza."""
        views = list(sessions)  # the dict may change while we yield
        snapshot = views if counters_of is None else [_Shown(v, counters_of(v)) for v in views]
        limits, labels = self._limits, self.labels
        for name, help_text in FAMILIES:
            yield f"# HELP {name} {help_text}\n# TYPE {name} gauge\n".encode()
            for start in range(0, len(snapshot), CHUNK):
                chunk = snapshot[start : start + CHUNK]
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
