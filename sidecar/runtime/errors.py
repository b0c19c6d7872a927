"""The runtime's refusals: a caller's bad input (defined with the input rules), and a session it does not know."""

from __future__ import annotations

from sidecar.rules.inputs import InvalidInput
from sidecar.rules.records import ClosureRecord


class UnknownSession(LookupError):
    def __init__(self, organization_phone_id: int) -> None:
        super().__init__(f"no session with organizationPhoneId {organization_phone_id}")
        self.organization_phone_id = organization_phone_id


__all__ = ["CloseIncomplete", "InvalidInput", "UnknownSession"]


class CloseIncomplete(RuntimeError):
    """An operator's close whose database half failed for a reason of its own: not done; retry it."""

    def __init__(self, record: ClosureRecord, failed: dict[str, str]) -> None:
        parts = ", ".join(f"{part} {outcome}" for part, outcome in failed.items())
        phone_id = record.phone.organization_phone_id
        super().__init__(f"the close of organizationPhoneId {phone_id} did not complete: {parts}")
        self.record = record
        self.failed = failed
