"""Fleet safety as the runtime carries it out: the circuit breaker's admission of automatic logouts, the
enforce/observe mode, and the incidents (a logout that did not stick, reconnect loops, credential conflicts).
The rules themselves are pure, in sidecar.rules.safety; a new incident type is a rule there, an event in
INCIDENT_EVENTS and a branch in `Incidents`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.ports import SocketController
from sidecar.rules.policy import CRYPTO_LIMIT_REASONS, Close, ErrorStats, Transition
from sidecar.rules.records import CloseTrigger, NotificationEvent, PhoneRef
from sidecar.rules.safety import (
    Breaker,
    BreakerConfig,
    BreakerStatus,
    IncidentKind,
    LoopDetector,
    Mode,
    is_reconnect_after_logout,
)
from sidecar.runtime.notices import Notices
from sidecar.runtime.outcomes import socket_command
from sidecar.runtime.registry import SessionRegistry
from sidecar.runtime.tasks import BackgroundTasks

INCIDENT_EVENTS = {
    IncidentKind.RECONNECTED_AFTER_LOGOUT: NotificationEvent.RECONNECTED_AFTER_LOGOUT,
    IncidentKind.RECONNECT_LOOP: NotificationEvent.RECONNECT_LOOP,
    IncidentKind.CREDENTIALS_CONFLICT: NotificationEvent.CREDENTIALS_CONFLICT,
}


@dataclass
class Safety:
    """The fleet safety state the runtime consults; operators change it through the API without a restart."""

    breaker: Breaker = field(default_factory=lambda: Breaker(BreakerConfig()))
    restarts: Breaker = field(default_factory=lambda: Breaker(BreakerConfig()))  # deaf-session restarts
    loops: LoopDetector = field(default_factory=LoopDetector)
    mode: Mode = Mode.ENFORCE
    observe_organizations: frozenset[int] = frozenset()
    logout_stick_seconds: float = 3600.0

    def observing(self, organization_id: int) -> bool:
        return self.mode is Mode.OBSERVE or organization_id in self.observe_organizations

    def admit_automatic_close(self, now: float, live_sessions: int) -> tuple[bool, bool]:
        """(admitted, this refusal tripped the breaker)."""
        return _admit(self.breaker, now, live_sessions)

    def admit_restart(self, now: float, live_sessions: int) -> tuple[bool, bool]:
        """A deaf-session restart, on its own budget: (admitted, this refusal tripped it)."""
        return _admit(self.restarts, now, live_sessions)


def _admit(breaker: Breaker, now: float, live_sessions: int) -> tuple[bool, bool]:
    was_tripped = breaker.tripped
    admitted = breaker.admit(now, live_sessions)
    return admitted, not admitted and not was_tripped


def needs_admission(transition: Transition, trigger: CloseTrigger) -> bool:
    """An automatic close at a crypto limit needs the circuit breaker's admission."""
    decision = transition.decision
    return trigger is CloseTrigger.AUTOMATIC and isinstance(decision, Close) and decision.reason in CRYPTO_LIMIT_REASONS


@dataclass(frozen=True, slots=True)
class SafetyView:
    """What adapters read of fleet safety: the breaker's status and settings, and the mode."""

    breaker: BreakerStatus
    breaker_config: BreakerConfig
    mode: Mode
    observe_organizations: frozenset[int]


class Incidents:
    """Turns incident rules' findings into records, webhooks and, for a logout that did not stick, a new end."""

    def __init__(
        self,
        safety: Safety,
        registry: SessionRegistry,
        notices: Notices,
        sockets: SocketController,
        tasks: BackgroundTasks,
        stats_of: Callable[[PhoneRef], ErrorStats],
        *,
        socket_timeout: float,
    ) -> None:
        self._safety = safety
        self._registry = registry
        self._notices = notices
        self._sockets = sockets
        self._tasks = tasks
        self._stats_of = stats_of
        self._socket_timeout = socket_timeout

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
