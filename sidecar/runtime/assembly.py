"""Builds a SessionRuntime whole: the shared parts once, then each collaborator with what it needs passed in,
and the decider chosen once (the fleet's when a shared FleetState is given, else the local one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from opentelemetry import trace

from sidecar.ports import FleetState, LivenessSockets, LossLedger, SessionStore, SocketController, StepQueue
from sidecar.rules.liveness import DeafAction, LivenessConfig
from sidecar.rules.loss import LossTracker
from sidecar.rules.policy import PolicyConfig
from sidecar.runtime.close import CloseSequence
from sidecar.runtime.decider import Decider, DecisionTools, LocalDecider
from sidecar.runtime.effects import Effects
from sidecar.runtime.engine import Collaborators, SessionRuntime
from sidecar.runtime.fleet_decider import FleetDecider
from sidecar.runtime.heal import HealRunner
from sidecar.runtime.incidents import Incidents
from sidecar.runtime.key_removal import KeyRemoval
from sidecar.runtime.liveness_watch import LivenessWatch
from sidecar.runtime.message_loss import MessageLoss
from sidecar.runtime.notices import Notices
from sidecar.runtime.observer import IsolatedObservers, RuntimeObserver
from sidecar.runtime.parts import RuntimeParts
from sidecar.runtime.registry import MemorySessionRegistry, SessionRegistry
from sidecar.runtime.restrictions import Restrictions
from sidecar.runtime.safety_state import Safety
from sidecar.runtime.tasks import BackgroundTasks
from sidecar.runtime.waiting import EventJournal


@dataclass(frozen=True)
class Fleet:
    """Fleet mode: decisions taken in PostgreSQL and shared by every replica (runtime/fleet_decider.py)."""

    shared: FleetState
    backlog_limit: int = 100_000
    journal: EventJournal | None = None
    on_dropped: Callable[[str], None] | None = None  # an accepted event could not be decided: its reason
    on_decided: Callable[[], None] | None = None  # after every committed batch (wakes webhook delivery)


@dataclass(frozen=True)
class Watch:
    """The deaf-session watch (rules/liveness.py) and what it may do."""

    config: LivenessConfig = field(default_factory=LivenessConfig)
    action: DeafAction = DeafAction.NONE
    sockets: LivenessSockets | None = None


def assemble(
    policy: PolicyConfig,
    store: SessionStore,
    steps: StepQueue,
    sockets: SocketController,
    observers: Sequence[RuntimeObserver] = (),
    *,
    clock: Callable[[], datetime],
    socket_end_timeout: float = 5.0,
    database_step_timeout: float = 5.0,
    tracer: trace.Tracer | None = None,
    notifications: bool = False,
    safety: Safety | None = None,
    registry: SessionRegistry | None = None,
    fleet: Fleet | None = None,
    state_ttl: float = 86_400.0,
    watch: Watch | None = None,
    keys: KeyRemoval | None = None,
    losses: LossTracker | None = None,
    loss_ledger: LossLedger | None = None,
    on_failure: Callable[[str, str], None] | None = None,
) -> SessionRuntime:
    """`on_failure(what, name)`: an observer ("observer", its class) or a background effect ("task", "effects")
    raised; it was logged and isolated."""
    report = on_failure or (lambda what, name: None)
    fan_out: list[RuntimeObserver] = [IsolatedObservers(observers, lambda name: report("observer", name))]
    parts = RuntimeParts(
        policy=policy,
        registry=registry or MemorySessionRegistry(),
        steps=steps,
        sockets=sockets,
        observers=fan_out,
        notices=Notices(notifications, clock, fan_out, steps),
        tasks=BackgroundTasks(lambda: report("task", "effects")),
        tracer=tracer or trace.NoOpTracerProvider().get_tracer("whatsapp-session-sidecar"),
        clock=clock,
        safety=safety or Safety(),
        socket_timeout=socket_end_timeout,
        database_timeout=database_step_timeout,
        keys=keys or KeyRemoval(),
    )
    closes = CloseSequence(parts, fleet.shared.release_close if fleet is not None else None)
    incidents = Incidents(parts)
    effects = Effects(parts, HealRunner(parts), closes, incidents)
    tools = DecisionTools(parts, effects, closes, incidents, store)
    decider: Decider
    if fleet is not None:
        decider = FleetDecider(
            tools, fleet.shared,
            seed_settings=(parts.safety.mode, parts.safety.observe_organizations),
            backlog_limit=fleet.backlog_limit, journal=fleet.journal, on_dropped=fleet.on_dropped,
            on_decided=fleet.on_decided,
        )  # fmt: skip
    else:
        decider = LocalDecider(tools)
    watch = watch or Watch()
    liveness = LivenessWatch(parts, incidents, watch.config, watch.action, watch.sockets)
    losing = MessageLoss(parts, losses, loss_ledger)
    collaborators = Collaborators(decider, effects, incidents, liveness, store, state_ttl, Restrictions(parts), losing)
    return SessionRuntime(parts, collaborators)
