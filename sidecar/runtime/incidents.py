"""Incidents as the runtime carries them out: a logout that did not stick, reconnect loops, credential conflicts
(records, webhooks and, for a logout that did not stick, a new end). The rules themselves are pure, in
sidecar.rules.safety; a new incident type is a rule there, an event in INCIDENT_EVENTS and a method here."""

from __future__ import annotations

from typing import Any

from sidecar.rules.records import NotificationEvent, PhoneRef
from sidecar.rules.safety import (
    IncidentKind,
    is_reconnect_after_logout,
)
from sidecar.runtime.outcomes import socket_command
from sidecar.runtime.parts import RuntimeParts

INCIDENT_EVENTS = {
    IncidentKind.RECONNECTED_AFTER_LOGOUT: NotificationEvent.RECONNECTED_AFTER_LOGOUT,
    IncidentKind.RECONNECT_LOOP: NotificationEvent.RECONNECT_LOOP,
    IncidentKind.CREDENTIALS_CONFLICT: NotificationEvent.CREDENTIALS_CONFLICT,
}


class Incidents:
    """Turns incident rules' findings into records, webhooks and, for a logout that did not stick, a new end."""

    def __init__(self, parts: RuntimeParts) -> None:
        self._safety = parts.safety
        self._registry = parts.registry
        self._notices = parts.notices
        self._sockets = parts.sockets
        self._tasks = parts.tasks
        self._stats_of = parts.stats_of
        self._socket_timeout = parts.socket_timeout

    def reconnected_after_logout(self, organization_phone_id: int, now: float, new_login: bool) -> PhoneRef | None:
        """The closed phone, when this `open` means a logout by the sidecar did not stick; else None."""
        logged_out = self._registry.logged_out(organization_phone_id)
        closed = self._registry.closed_phone(organization_phone_id)
        if (
            logged_out is not None
            and not logged_out.observed
            and closed is not None
            and is_reconnect_after_logout(logged_out.at, now, self._safety.logout_stick_seconds, new_login)
        ):
            return closed
        return None

    async def logout_did_not_stick(self, phone: PhoneRef, seconds_after: float) -> None:
        """Some runtime reconnected a phone the sidecar logged out: say so, and end it again."""
        kind = IncidentKind.RECONNECTED_AFTER_LOGOUT
        await self.record(phone, str(kind), {"secondsAfterLogout": round(seconds_after, 3)}, INCIDENT_EVENTS[kind])
        reason = "reconnected after a sidecar logout without a new login"
        command = self._sockets.end_session(phone.organization_phone_id, "reconnected_after_logout", reason)
        self._tasks.spawn(socket_command(command, "ended", self._socket_timeout))

    async def credentials_conflict(self, phone: PhoneRef, detail: dict[str, Any]) -> None:
        kind = IncidentKind.CREDENTIALS_CONFLICT
        await self.record(phone, str(kind), detail, INCIDENT_EVENTS[kind])

    async def connection_closed(self, phone: PhoneRef, now: float, status_code: int | None) -> None:
        for kind in self._safety.loops.on_close(phone.organization_phone_id, now, status_code):
            await self.record(phone, str(kind), {"statusCode": status_code}, INCIDENT_EVENTS[kind])

    async def record(
        self, phone: PhoneRef | None, decision: str, detail: dict[str, Any], event: NotificationEvent | None
    ) -> None:
        stats: dict[str, Any] = dict(self._stats_of(phone)) if phone is not None else {}
        await self._notices.record(phone, decision, detail, event, stats)
