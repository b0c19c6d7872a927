"""The runtime connections of this process and which one holds each phone: the SocketController over the
WebSocket link. Commands go to the connection that last reported a session and wait for its `command.ack`; the
connection closing first, or no connection owning the session, makes them SocketUnreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from sidecar.events.schema import AuthClear, CommandAck, OutboundCommand, SessionEnd, SessionProbe, SessionRestart
from sidecar.ports import SocketLeases, SocketUnreachable, StoreUnavailable, command_failure
from sidecar.runtime.liveness_watch import RESTART_STATUS

log = logging.getLogger("sidecar.link")

_connection_ids = itertools.count(1)


@dataclass(eq=False)
class RuntimeConnection:
    ws: web.WebSocketResponse
    peer: str
    id: int = field(default_factory=lambda: next(_connection_ids))
    phones: set[int] = field(default_factory=set)


class LinkConnections:
    """Tracks runtime connections and which one owns each session; sends commands and matches their acks.
    `leases` (fleet mode): socket ownership shared through PostgreSQL, released when a phone is let go."""

    def __init__(self, leases: SocketLeases | None = None) -> None:
        self.leases = leases
        self._connections: set[RuntimeConnection] = set()
        self._owners: dict[int, RuntimeConnection] = {}
        self._commands: dict[str, tuple[RuntimeConnection, asyncio.Future[CommandAck]]] = {}
        self.ownership_changes = 0
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def commands_in_flight(self) -> int:
        return len(self._commands)

    def owner_of(self, organization_phone_id: int) -> RuntimeConnection | None:
        return self._owners.get(organization_phone_id)

    def forget(self, phones: Sequence[int]) -> None:
        """Phones whose sessions expired (disconnected, holding nothing, for the state TTL): the runtime has not
        reported them open since, so their ownership and fleet leases go too (an `open` claims them again)."""
        released = []
        for phone in phones:
            connection = self._owners.pop(phone, None)
            if connection is not None:
                connection.phones.discard(phone)
                released.append(phone)
        if released:
            self._release_leases_later(released)

    def owned_phones(self) -> list[int]:
        return [phone for phone, connection in self._owners.items() if not connection.ws.closed]

    # SocketController ---------------------------------------------------------------------------------

    async def end_session(self, organization_phone_id: int, reason: str, detail: str) -> None:
        connection = self._owners.pop(organization_phone_id, None)  # the sidecar forgets it, whatever happens
        if connection is not None:
            connection.phones.discard(organization_phone_id)
            self._release_leases_later([organization_phone_id])
        await self._command(
            connection,
            organization_phone_id,
            lambda command_id: SessionEnd(
                command_id=command_id, organization_phone_id=organization_phone_id, reason=reason, detail=detail
            ),
        )

    async def clear_cached_keys(self, organization_phone_id: int, key_prefixes: Sequence[str]) -> None:
        await self._command(
            self._owners.get(organization_phone_id),
            organization_phone_id,
            lambda command_id: AuthClear(
                command_id=command_id, organization_phone_id=organization_phone_id, key_prefixes=list(key_prefixes)
            ),
        )

    async def probe_session(self, organization_phone_id: int) -> float:
        started = time.perf_counter()
        ack = await self._command(
            self._owners.get(organization_phone_id),
            organization_phone_id,
            lambda command_id: SessionProbe(command_id=command_id, organization_phone_id=organization_phone_id),
        )
        # The runtime's own measure of the round trip with WhatsApp; ours (it includes the link) if it gave none.
        return ack.round_trip_ms if ack.round_trip_ms is not None else (time.perf_counter() - started) * 1000

    async def restart_session(self, organization_phone_id: int, reason: str, detail: str) -> None:
        await self._command(
            self._owners.get(organization_phone_id),
            organization_phone_id,
            lambda command_id: SessionRestart(
                command_id=command_id, organization_phone_id=organization_phone_id, reason=reason, detail=detail,
                status_code=RESTART_STATUS,
            ),
        )  # fmt: skip

    async def _command(
        self,
        connection: RuntimeConnection | None,
        organization_phone_id: int,
        build: Callable[[str], OutboundCommand],
    ) -> CommandAck:
        if connection is None or connection.ws.closed:
            raise SocketUnreachable(f"no runtime connection owns organizationPhoneId {organization_phone_id}")
        command_id = uuid.uuid4().hex
        future: asyncio.Future[CommandAck] = asyncio.get_running_loop().create_future()
        self._commands[command_id] = (connection, future)
        try:
            await connection.ws.send_json(msgspec.to_builtins(build(command_id)))
            return await future
        except ConnectionError as error:
            raise SocketUnreachable(f"runtime connection lost: {error}") from error
        finally:
            self._commands.pop(command_id, None)

    def acknowledge(self, ack: CommandAck) -> None:
        entry = self._commands.get(ack.command_id)
        if entry is None or entry[1].done():
            log.info("ack for an unknown or finished command", extra={"fields": {"commandId": ack.command_id}})
            return
        future = entry[1]
        if ack.ok:
            future.set_result(ack)
        else:
            future.set_exception(command_failure(ack.error))

    # Connections and ownership ------------------------------------------------------------------------

    def connected(self, ws: web.WebSocketResponse, peer: str) -> RuntimeConnection:
        connection = RuntimeConnection(ws, peer)
        self._connections.add(connection)
        return connection

    def claim(self, connection: RuntimeConnection, organization_phone_id: int) -> bool:
        """Commands for the phone go to this connection from now on; True when that is new."""
        current = self._owners.get(organization_phone_id)
        if current is connection:
            return False
        if current is not None and not current.ws.closed:
            self.ownership_changes += 1
            log.warning(
                "two runtime connections report one session; commands now go to the latest",
                extra={
                    "fields": {
                        "organizationPhoneId": organization_phone_id,
                        "previousConnection": current.id,
                        "connection": connection.id,
                    }
                },
            )
            current.phones.discard(organization_phone_id)
        self._owners[organization_phone_id] = connection
        connection.phones.add(organization_phone_id)
        return True

    def disconnected(self, connection: RuntimeConnection) -> None:
        self._connections.discard(connection)
        released = [phone for phone in connection.phones if self._owners.get(phone) is connection]
        for phone in released:
            del self._owners[phone]
        if released:
            self._release_leases_later(released)
        connection.phones.clear()
        for command_id, (owner, future) in list(self._commands.items()):
            if owner is connection and not future.done():
                future.set_exception(SocketUnreachable("runtime connection closed before it acknowledged"))
                del self._commands[command_id]

    def _release_leases_later(self, phones: list[int]) -> None:
        """Fleet mode: give the phones' leases back without holding up the caller (they expire otherwise)."""
        if self.leases is not None:
            task = asyncio.create_task(self._release_leases(self.leases, phones))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    @staticmethod
    async def _release_leases(leases: SocketLeases, phones: list[int]) -> None:
        with contextlib.suppress(StoreUnavailable):  # the leases expire by themselves
            await leases.release(phones)

    async def close_all(self) -> None:
        for connection in list(self._connections):
            await connection.ws.close(code=1001, message=b"sidecar shutting down")
