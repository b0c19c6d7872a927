"""The fleet safety state the runtime consults: the circuit breakers' admission of automatic logouts and
deaf-session restarts, the enforce/observe mode, and the view adapters read (SafetyView). The rules themselves
are pure, in sidecar.rules.safety."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.rules.policy import CRYPTO_LIMIT_REASONS, Close, Transition
from sidecar.rules.records import CloseTrigger
from sidecar.rules.safety import Breaker, BreakerConfig, BreakerStatus, LoopDetector, Mode


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
