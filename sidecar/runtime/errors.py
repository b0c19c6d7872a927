"""The runtime's refusals: a caller's bad input (defined with the input rules), and a session it does not know."""

from __future__ import annotations

from sidecar.rules.inputs import InvalidInput


class UnknownSession(LookupError):
    def __init__(self, organization_phone_id: int) -> None:
        super().__init__(f"no session with organizationPhoneId {organization_phone_id}")
        self.organization_phone_id = organization_phone_id


__all__ = ["InvalidInput", "UnknownSession"]
