"""What an operator's close shares whoever decides it (runtime/decider.py, runtime/fleet_decider.py): the
checked reason, the outcome (a close whose database half failed is not reported done) and the last closure."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.ports import SessionStore
from sidecar.rules.inputs import text_problem
from sidecar.rules.records import ClosureRecord, StepOutcome
from sidecar.rules.safety import Mode
from sidecar.runtime.close import database_failed
from sidecar.runtime.errors import CloseIncomplete, InvalidInput

MAX_REASON_LENGTH = 500


@dataclass(frozen=True, slots=True)
class CloseOutcome:
    record: ClosureRecord | None
    already_closed: bool


def checked_reason(reason: object) -> str:
    """forceCloseSession's reason, stripped; InvalidInput names what is wrong with it."""
    text = reason.strip() if isinstance(reason, str) else ""
    if not text:
        raise InvalidInput("reason", "must be a non-empty text saying why the session is closed")
    if len(text) > MAX_REASON_LENGTH:
        raise InvalidInput("reason", f"must be at most {MAX_REASON_LENGTH} characters")
    if (problem := text_problem(text)) is not None:
        raise InvalidInput("reason", problem)
    return text


def closed_outcome(record: ClosureRecord, already_closed: bool) -> CloseOutcome:
    """A close whose database half failed by itself was undone (the session stays open): say so, do not report
    it as done, so the operator retries instead of reading `alreadyClosed`."""
    if database_failed(record):
        failed = {part: step for part, step in record.steps.items() if step.startswith(StepOutcome.FAILED)}
        raise CloseIncomplete(record, failed)
    return CloseOutcome(record, already_closed)


def all_done(records: list[ClosureRecord]) -> list[ClosureRecord]:
    """The held sessions closed on a release; one whose database half failed is named (it stays open)."""
    for record in records:
        closed_outcome(record, already_closed=False)
    return records


async def last_closure(store: SessionStore, organization_phone_id: int) -> ClosureRecord | None:
    try:
        closures = await store.recent_closures(organization_phone_id, 1)
    except Exception:
        return None
    return closures[0] if closures else None


def mode_detail(mode: Mode, observe_organizations: frozenset[int], operator: str) -> dict[str, object]:
    """A mode change as the decision record shows it."""
    return {"operator": operator, "mode": str(mode), "observeOrganizations": sorted(observe_organizations)}
