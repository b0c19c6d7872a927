"""Per-session gauge families, rendered at scrape time straight from the runtime's sessions.

Stock gauges format every sample through the generic exposition code on each scrape (about 500 ms for 10k
sessions x 5 series here), which stalls the event loop that serves the runtime link. Here each session's label
text is escaped and built once and cached; a scrape only formats numbers, and yields to the event loop every
CHUNK sessions so event processing is never blocked for more than a few milliseconds. The text is valid in
both the Prometheus text format and OpenMetrics (gauge lines are the same in both).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from sidecar.observers import BaseObserver
from sidecar.policy import Limits, is_healthy
from sidecar.records import PhoneRef
from sidecar.runtime import Session

CHUNK = 2000
DEFAULT_TEAM = "unassigned"

FAMILIES = (
    ("whatsapp_session_bad_mac_errors", "Current Bad MAC counter of the session"),
    ("whatsapp_session_bad_decrypt_errors", "Current app-state bad decrypt counter of the session"),
    ("whatsapp_session_healthy", "1 while isHealthy is true (no counter one short of its limit)"),
    ("whatsapp_session_connected", "1 while the runtime reports the connection open"),
    ("whatsapp_session_last_error_timestamp_seconds", "Time of the session's last decryption error"),
)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class SessionFamilies(BaseObserver):
    def __init__(self, limits: Limits, team_of: Callable[[int], str]) -> None:
        self._limits = limits
        self._team_of = team_of
        self._labels: dict[int, str] = {}

    def labels(self, phone: PhoneRef) -> str:
        cached = self._labels.get(phone.organization_phone_id)
        if cached is None:
            team = escape_label_value(self._team_of(phone.organization_id))
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

    async def render(self, sessions: Iterable[Session]) -> bytes:
        snapshot = list(sessions)  # the dict may change while we yield
        rows: list[tuple[str, int, int, int, int, float | None]] = []
        for start in range(0, len(snapshot), CHUNK):
            for session in snapshot[start : start + CHUNK]:
                counters = session.state.counters
                rows.append(
                    (
                        self.labels(session.phone),
                        counters.bad_mac_errors,
                        counters.bad_decrypt_errors,
                        1 if is_healthy(counters, self._limits) else 0,
                        1 if session.connected else 0,
                        session.last_error_at,
                    )
                )
            await asyncio.sleep(0)
        parts: list[str] = []
        for index, (name, help_text) in enumerate(FAMILIES):
            parts.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
            column = index + 1
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start : start + CHUNK]
                if column == 5:
                    parts.extend(f"{name}{row[0]} {row[5]}\n" for row in chunk if row[5] is not None)
                else:
                    parts.extend(f"{name}{row[0]} {row[column]}\n" for row in chunk)
                await asyncio.sleep(0)
        return "".join(parts).encode()
