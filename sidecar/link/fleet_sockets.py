"""Fleet mode's socket commands: one owner per phone. A command decided on any replica reaches the socket
through the replica whose runtime connection holds the phone's lease (ports.SocketLeases); a replica also
delivers the commands other replicas route to it, and renews its leases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from sidecar.link.connections import LinkConnections
from sidecar.ports import SocketCommandFailed, SocketLeases, SocketUnreachable, StoreUnavailable, command_failure

log = logging.getLogger("sidecar.link")

RESULT_POLL_SECONDS = 0.02
COMMAND_POLL_SECONDS = 1.0  # the fallback when a NOTIFY was missed
FORGET_EVERY_BEATS = 12  # answered commands are forgotten about once a minute (heartbeats every 5 s)


class FleetSockets:
    """The SocketController in fleet mode: the local connection when it holds the phone, else its owner's."""

    def __init__(self, link: LinkConnections, leases: SocketLeases, lease_seconds: float) -> None:
        self._link = link
        self._leases = leases
        self._lease_seconds = lease_seconds
        self._wake = asyncio.Event()
        self.routed = 0
        self.delivered_for_others = 0

    async def end_session(self, organization_phone_id: int, reason: str, detail: str) -> int | None:
        if self._link.owner_of(organization_phone_id) is not None:
            return await self._link.end_session(organization_phone_id, reason, detail)
        body = {"type": "session.end", "reason": reason, "detail": detail, "logout": True}
        try:
            return await self._route(organization_phone_id, body)
        except SocketUnreachable:
            await self._link.owe_end(organization_phone_id, reason, detail)  # whichever replica it reaches delivers
            raise

    async def clear_cached_keys(self, organization_phone_id: int, key_prefixes: Sequence[str]) -> int | None:
        if self._link.owner_of(organization_phone_id) is not None:
            return await self._link.clear_cached_keys(organization_phone_id, key_prefixes)
        return await self._route(organization_phone_id, {"type": "auth.clear", "keyPrefixes": list(key_prefixes)})

    async def probe_session(self, organization_phone_id: int) -> float:
        """Probes go to the local connection only: the liveness watch runs where the session's traffic arrives."""
        return await self._link.probe_session(organization_phone_id)

    async def restart_session(self, organization_phone_id: int, reason: str, detail: str) -> None:
        if self._link.owner_of(organization_phone_id) is not None:
            await self._link.restart_session(organization_phone_id, reason, detail)
            return
        await self._route(organization_phone_id, {"type": "session.restart", "reason": reason, "detail": detail})

    async def _route(self, organization_phone_id: int, body: dict[str, Any]) -> int | None:
        """The command through its owner; returns the runtime's `keysDeleted`."""
        try:
            owner = await self._leases.owner(organization_phone_id)
            if owner is None or owner == self._leases.instance:
                raise SocketUnreachable(f"no live replica holds organizationPhoneId {organization_phone_id}")
            command_id = await self._leases.send(owner, organization_phone_id, body)
            self.routed += 1
            while True:  # the caller bounds the wait (the socket-end timeout)
                status, error, keys_deleted = await self._leases.result(command_id)
                if status not in ("pending", "delivering"):
                    break
                await asyncio.sleep(RESULT_POLL_SECONDS)
        except StoreUnavailable as unavailable:
            raise SocketUnreachable(f"cannot reach the owning replica: {unavailable}") from unavailable
        if status == "failed":
            raise command_failure(error)
        if status != "ok":
            raise SocketUnreachable(error or f"the owning replica answered {status}")
        return keys_deleted

    # The owner's side ---------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def deliver_routed(self, stop: asyncio.Event) -> None:
        """Deliver the commands other replicas routed here, when woken (NOTIFY) or every COMMAND_POLL_SECONDS."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), COMMAND_POLL_SECONDS)
            self._wake.clear()
            try:
                commands = await self._leases.take_commands()
                await self._link.refresh_owed()
            except StoreUnavailable:
                continue
            await asyncio.gather(*(self._deliver(*command) for command in commands))

    async def _deliver(self, command_id: str, organization_phone_id: int, body: dict[str, Any]) -> None:
        status, error, keys_deleted = "ok", None, None
        phone, reason, detail = organization_phone_id, str(body.get("reason")), str(body.get("detail"))
        try:
            if body.get("type") == "session.end":
                keys_deleted = await self._link.end_session(phone, reason, detail)
            elif body.get("type") == "session.restart":
                await self._link.restart_session(phone, reason, detail)
            else:
                keys_deleted = await self._link.clear_cached_keys(phone, list(body.get("keyPrefixes", [])))
            self.delivered_for_others += 1
        except SocketUnreachable as unreachable:
            status, error = "unreachable", str(unreachable)
        except SocketCommandFailed as failed:
            status, error = "failed", str(failed)
        with contextlib.suppress(StoreUnavailable):
            await self._leases.finish(command_id, status, error, keys_deleted)

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Renew this replica's lease (one row, whatever it holds: every phone it holds stays owned), with how
        many sessions it holds; now and then, forget answered commands (a bounded batch)."""
        beats = 0
        while not stop.is_set():
            with contextlib.suppress(StoreUnavailable):
                await self._leases.renew(len(self._link.owned_phones()))
                if beats % FORGET_EVERY_BEATS == 0:
                    await self._leases.forget_commands()
            beats += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._lease_seconds / 3)
