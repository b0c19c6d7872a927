"""The runtime: carries the rules' decisions out, through the ports only.

    assembly.py        assemble(): builds a SessionRuntime whole (the parts once, the decider chosen once)
    parts.py           RuntimeParts: what every part shares, passed whole
    engine.py          SessionRuntime: events in (link v1 structs, the seed's API), spans, the decider asked
    decider.py         the Decider port, and LocalDecider (one replica: decisions in this process)
    fleet_decider.py   FleetDecider: decisions in database transactions (ports.FleetState), failing closed
    decision_queue.py  the fleet's undecided events: ordered, bounded, journaled
    effects.py         carrying a decision out (state, observers, heal or close), whoever took it
    registry.py        the session registry port (decision state, closed/logged-out markers) and its memory form
    heal.py            heal execution, one per session, later heals merged per scope
    close.py           the close sequence: socket, database half, forget
    key_removal.py     where heals and closes delete the auth keys: the store's step, a key store, the runtime
    safety_state.py    the breakers' admission, the mode; SafetyView
    incidents.py       logout-stick, reconnect loops, conflicts: records, webhooks, ends (where a new incident goes)
    liveness_watch.py  the deaf-session watch: probes, verdicts, restarts
    operator.py        what an operator's close shares: the reason checked, the outcome, the last closure
    notices.py         owner notifications and decision records
    observer.py        the outbound port: RuntimeObserver (logs, metrics, traces subscribe) and its fan-out
    tally.py           a batch's errors that change no decision, counted once per class and organization
    waiting.py         events waiting for a fleet decision, and their journal form
    outcomes.py        socket-command outcomes, span marking, trace context
    tasks.py           tracked background effects
    errors.py          InvalidInput, UnknownSession, CloseIncomplete

Adapters read sessions through `SessionView` and safety through `SafetyView`; they never hold a mutable part.
"""

from sidecar.runtime.assembly import Fleet, Watch, assemble
from sidecar.runtime.engine import SessionRuntime
from sidecar.runtime.errors import InvalidInput, UnknownSession
from sidecar.runtime.key_removal import KeyRemoval
from sidecar.runtime.operator import CloseOutcome
from sidecar.runtime.registry import SessionView
from sidecar.runtime.safety_state import Safety, SafetyView

__all__ = [
    "CloseOutcome",
    "Fleet",
    "InvalidInput",
    "KeyRemoval",
    "Safety",
    "SafetyView",
    "SessionRuntime",
    "SessionView",
    "UnknownSession",
    "Watch",
    "assemble",
]
