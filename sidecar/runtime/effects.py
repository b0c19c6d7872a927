"""Carrying a decision out, the half every decision shares whoever took it (this process, or a fleet
transaction): write the decided state, tell the observers, build the owners' health-flip notification, start
the effect (heal or close), and record holds and breaker trips."""

from __future__ import annotations

from sidecar.rules.policy import (
    Close,
    Heal,
    Hold,
    Phase,
    SessionState,
    Transition,
    error_stats,
    is_healthy,
)
from sidecar.rules.records import CloseTrigger, Notification, NotificationEvent, PhoneRef
from sidecar.rules.safety import BreakerStatus
from sidecar.runtime.close import CloseSequence
from sidecar.runtime.heal import HealRunner
from sidecar.runtime.incidents import Incidents
from sidecar.runtime.parts import RuntimeParts
from sidecar.runtime.registry import Session


class Effects:
    def __init__(self, parts: RuntimeParts, heals: HealRunner, closes: CloseSequence, incidents: Incidents) -> None:
        self.policy = parts.policy
        self._registry = parts.registry
        self._observers = parts.observers
        self._notices = parts.notices
        self._heals = heals
        self._closes = closes
        self._incidents = incidents

    def set_connected(self, session: Session, connected: bool) -> None:
        if session.connected != connected:
            session.connected = connected
            for observer in self._observers:
                observer.connection_changed(session.phone, connected)

    def health_flip(self, before: SessionState, after: SessionState) -> Notification | None:
        """The owners' notification when isHealthy flips on an active session (None otherwise or unowned)."""
        healthy_before = is_healthy(before.counters, self.policy.limits)
        healthy_after = is_healthy(after.counters, self.policy.limits)
        if healthy_before == healthy_after or after.phase is not Phase.ACTIVE:
            return None
        stats = error_stats(after.counters, self.policy.limits)
        event_kind = NotificationEvent.RECOVERED if healthy_after else NotificationEvent.UNHEALTHY
        return self._notices.notification(event_kind, dict(stats), None)

    def carry_out(
        self,
        session: Session,
        before: SessionState,
        transition: Transition,
        trigger: CloseTrigger,
        flip: Notification | None,
        generation: int | None = None,
    ) -> None:
        """Write the decided state, tell the observers, and start the decision's effect (heal or close)."""
        session.state = transition.state
        if transition.state.phase is Phase.HELD:
            self._registry.note_held()
        for observer in self._observers:
            observer.counters_changed(session.phone, transition.state.counters)
        if is_healthy(before.counters, self.policy.limits) != is_healthy(
            transition.state.counters, self.policy.limits
        ) and (transition.state.phase is Phase.ACTIVE):
            stats = error_stats(transition.state.counters, self.policy.limits)
            for observer in self._observers:
                observer.health_changed(session.phone, stats)
        decision = transition.decision
        if isinstance(decision, Heal):
            self._heals.start(session, decision)
        elif isinstance(decision, Close):
            self._heals.supersede(session.organization_phone_id)
            self._closes.start(session, decision, trigger, generation)

    async def after_decision(self, phone: PhoneRef, decision: object, tripped: BreakerStatus | None) -> None:
        """Records of a hold and of a breaker trip (`tripped`: the breaker this decision tripped), once the
        decision stands."""
        if isinstance(decision, Hold):
            detail = {"reason": str(decision.reason), "detail": decision.detail}
            await self._incidents.record(phone, "session.held", detail, NotificationEvent.HELD)
        if tripped is not None:
            counts = {"closesInWindow": tripped.closes_in_window, "allowedInWindow": tripped.allowed_in_window}
            await self._incidents.record(None, "breaker.tripped", counts, NotificationEvent.BREAKER_TRIPPED)
