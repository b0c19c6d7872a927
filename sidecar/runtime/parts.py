"""What the runtime's parts share: built once by the assembly (runtime/assembly.py) and handed to each part
whole, instead of the same dozen objects passed one by one (the way prometheus_client takes `registry=`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from opentelemetry import trace

from sidecar.ports import SocketController, StepQueue
from sidecar.rules.policy import Counters, ErrorStats, HealthPolicy, PolicyConfig, SessionState, error_stats, windowed
from sidecar.rules.records import PhoneRef
from sidecar.runtime.key_removal import KeyRemoval
from sidecar.runtime.notices import Notices
from sidecar.runtime.observer import RuntimeObserver
from sidecar.runtime.registry import Session, SessionRegistry
from sidecar.runtime.safety_state import Safety
from sidecar.runtime.tasks import BackgroundTasks

ZERO_COUNTERS = SessionState().counters


@dataclass(frozen=True, slots=True)
class RuntimeParts:
    policy: PolicyConfig
    registry: SessionRegistry
    steps: StepQueue
    sockets: SocketController
    observers: Sequence[RuntimeObserver]  # one IsolatedObservers: each observer isolated
    notices: Notices
    tasks: BackgroundTasks
    tracer: trace.Tracer
    clock: Callable[[], datetime]
    safety: Safety
    socket_timeout: float
    database_timeout: float
    keys: KeyRemoval = KeyRemoval()  # noqa: RUF009 (frozen, shared safely): where heals and closes delete the auth keys (--key-store)

    def now(self) -> float:
        return self.clock().timestamp()

    def counters_now(self, session: Session) -> Counters:
        """The counters now: the windowed policy forgets errors that left the window since the last event."""
        if self.policy.health is HealthPolicy.WINDOWED:
            return windowed(session.state, None, self.policy.window_seconds, self.now()).counters
        return session.state.counters

    def stats_of(self, phone: PhoneRef) -> ErrorStats:
        """The phone's getSessionErrorStats as this process knows it (what records and webhooks carry)."""
        session = self.registry.get(phone.organization_phone_id)
        counters = self.counters_now(session) if session is not None else ZERO_COUNTERS
        return error_stats(counters, self.policy.limits)
