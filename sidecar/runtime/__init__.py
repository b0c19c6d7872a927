"""The runtime: carries the rules' decisions out, through the ports only.

    engine.py        SessionRuntime: events in (seed API and validated link events), decide, start effects
    fleet.py         fleet mode: decisions in database transactions (ports.FleetState), one decider, fail closed
    registry.py      the session registry port (decision state, closed/logged-out markers) and its memory form
    heal.py          heal execution, one per session, later heals merged per scope
    close.py         the close sequence: socket, database half, forget
    fleet_safety.py  breaker admission, mode, incidents (logout-stick, loops, conflicts); SafetyView
    operator.py      forceCloseSession and the breaker/mode controls
    notices.py       owner notifications and decision records
    observer.py      the outbound port: RuntimeObserver (logs, metrics, traces subscribe)
    outcomes.py      socket-command outcomes and span marking
    tasks.py         tracked background effects
    errors.py        InvalidInput, UnknownSession

Adapters read sessions through `SessionView` and safety through `SafetyView`; they never hold a mutable part.
"""

from sidecar.runtime.engine import SessionRuntime
from sidecar.runtime.errors import InvalidInput, UnknownSession
from sidecar.runtime.fleet_safety import Safety, SafetyView
from sidecar.runtime.operator import CloseOutcome
from sidecar.runtime.registry import SessionView

__all__ = ["CloseOutcome", "InvalidInput", "Safety", "SafetyView", "SessionRuntime", "SessionView", "UnknownSession"]
