"""Closes whose `session.end` no runtime connection could take (`socket: unreachable`): the keys are gone and the
phone is logged out, but the runtime still holds the socket. The end stays owed and is delivered when the runtime
that held the phone reconnects (the same `runtimeId`), or as soon as the phone shows up on any connection; the
close's database half is not repeated. One replica keeps them in memory; a fleet keeps them in PostgreSQL
(`socket_commands` rows with status `owed`, store/leases.py), so whichever replica the runtime reaches delivers."""

from __future__ import annotations

import uuid

from sidecar.ports import OwedEnd


class MemoryOwedEnds:
    """One replica's owed ends (coordination alone)."""

    def __init__(self) -> None:
        self._owed: dict[int, OwedEnd] = {}
        self._taken: dict[str, OwedEnd] = {}

    async def owe(self, organization_phone_id: int, reason: str, detail: str) -> None:
        if organization_phone_id not in self._owed:
            self._owed[organization_phone_id] = OwedEnd(uuid.uuid4().hex, organization_phone_id, reason, detail)

    async def owed_phones(self) -> set[int]:
        return set(self._owed)

    async def take_owed(self, organization_phone_id: int) -> OwedEnd | None:
        end = self._owed.pop(organization_phone_id, None)
        if end is not None:
            self._taken[end.command_id] = end
        return end

    async def owed_done(self, end: OwedEnd, delivered: bool) -> None:
        self._taken.pop(end.command_id, None)
        if not delivered:
            self._owed.setdefault(end.organization_phone_id, end)

    async def owed_dropped(self, end: OwedEnd) -> None:
        self._taken.pop(end.command_id, None)

    def forget_owed(self, organization_phone_ids: list[int]) -> None:
        for phone in organization_phone_ids:
            self._owed.pop(phone, None)
