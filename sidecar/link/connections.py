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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from sidecar.events.schema import AuthClear, CommandAck, OutboundCommand, SessionEnd, SessionProbe, SessionRestart
from sidecar.link.owed_ends import MemoryOwedEnds
from sidecar.ports import (
    OwedEnds,
    SocketCommandFailed,
    SocketLeases,
    SocketUnreachable,
    StoreUnavailable,
    command_failure,
)
from sidecar.runtime.liveness_watch import RESTART_STATUS

log = logging.getLogger("sidecar.link")

_connection_ids = itertools.count(1)


@dataclass(eq=False)
class RuntimeConnection:
    ws: web.WebSocketResponse
    peer: str
    id: int = field(default_factory=lambda: next(_connection_ids))
    phones: set[int] = field(default_factory=set)
    key: str = ""  # whose event sequence numbers these are: the runtime id, or this connection's own
    acks: asyncio.Queue[tuple[int, int]] = field(default_factory=asyncio.Queue)  # (durable mark, seq)
    acknowledger: asyncio.Task[None] | None = None
    draining: bool = False  # the sidecar is stopping: frames still arriving are not taken (they are resent)
    sequenced: bool = False  # its events carry `seq`: what it sends is kept until acknowledged
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no frame in progress
    runtime: tuple[str, str] | None = None  # (library, version) its runtime.info named: every phone it reports

    def __post_init__(self) -> None:
        self.key = self.key or f"connection:{self.id}"
        self.idle.set()


class LinkConnections:
    """Tracks runtime connections and which one owns each session; sends commands and matches their acks.
    `leases` (fleet mode): socket ownership shared through PostgreSQL, released when a phone is let go."""

    def __init__(
        self,
        leases: SocketLeases | None = None,
        owed: OwedEnds | None = None,
        owed_timeout: float = 10.0,
        on_owed_delivered: Callable[[], None] = lambda: None,
    ) -> None:
        """`owed`: the ends no connection could take (link/owed_ends.py), delivered within `owed_timeout` once the
        phone's runtime is back."""
        self.leases = leases
        self._owed = owed or MemoryOwedEnds()
        self._owed_timeout = owed_timeout
        self._on_owed_delivered = on_owed_delivered
        self.owed_cache: set[int] = set()  # phones with an end owed (a fleet's refreshed every second)
        self._delivering: set[asyncio.Task[None]] = set()
        self._away: dict[str, set[int]] = {}  # a runtime id's phones while it has no connection here
        self._connections: set[RuntimeConnection] = set()
        self._owners: dict[int, RuntimeConnection] = {}
        self._commands: dict[str, tuple[RuntimeConnection, asyncio.Future[CommandAck]]] = {}
        self.ownership_changes = 0
        self._to_release: set[int] = set()  # fleet mode: phones whose leases go back with the next statement
        self._releasing: asyncio.Task[None] | None = None

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
        for runtime_id, away in list(self._away.items()):
            away.difference_update(phones)
            if not away:
                del self._away[runtime_id]
        self._owed.forget_owed(list(phones))
        self.owed_cache.difference_update(phones)
        for phone in phones:
            connection = self._owners.pop(phone, None)
            if connection is not None:
                connection.phones.discard(phone)
                released.append(phone)
        if released:
            self._release_leases_later(released)

    def sessions_by_runtime(self, live: Callable[[int], bool]) -> Counter[tuple[str, str]]:
        """The `live` phones each (library, version) holds, over the connections that said which they run."""
        counts: Counter[tuple[str, str]] = Counter()
        for connection in self._connections:
            if connection.runtime is not None and not connection.ws.closed:
                counts[connection.runtime] += sum(1 for phone in connection.phones if live(phone))
        return counts

    def owned_phones(self) -> list[int]:
        return [phone for phone, connection in self._owners.items() if not connection.ws.closed]

    # SocketController ---------------------------------------------------------------------------------

    async def end_session(self, organization_phone_id: int, reason: str, detail: str) -> int | None:
        connection = self._owners.pop(organization_phone_id, None)  # the sidecar forgets it, whatever happens
        if connection is not None:
            connection.phones.discard(organization_phone_id)
            self._release_leases_later([organization_phone_id])
        if connection is None or connection.ws.closed:
            await self.owe_end(organization_phone_id, reason, detail)  # delivered once its runtime is back
        ack = await self._command(
            connection,
            organization_phone_id,
            lambda command_id: SessionEnd(
                command_id=command_id, organization_phone_id=organization_phone_id, reason=reason, detail=detail
            ),
        )
        return ack.keys_deleted

    async def owe_end(self, organization_phone_id: int, reason: str, detail: str) -> None:
        try:
            await self._owed.owe(organization_phone_id, reason, detail)
        except StoreUnavailable as error:
            log.warning("cannot remember a session.end owed to an absent runtime: %s", error)
            return
        self.owed_cache.add(organization_phone_id)
        log.info(
            "session.end owed until the runtime is back",
            extra={"fields": {"organizationPhoneId": organization_phone_id}},
        )

    async def refresh_owed(self) -> None:
        """Fleet mode: the phones any replica owes an end (so this one delivers when the phone shows up here)."""
        self.owed_cache = await self._owed.owed_phones()

    def deliver_owed_later(self, connection: RuntimeConnection, phones: Sequence[int]) -> None:
        """The phones showed up on `connection`: the ends owed for them go there (without holding up the frame)."""
        for phone in phones:
            if phone in self.owed_cache:
                self.owed_cache.discard(phone)
                task = asyncio.create_task(self._deliver_owed(connection, phone), name="owed-end")
                self._delivering.add(task)
                task.add_done_callback(self._delivering.discard)

    def drop_owed_later(self, phones: Sequence[int]) -> None:
        """A new login for these phones: the end owed to their old session is moot."""
        for phone in phones:
            if phone in self.owed_cache:
                self.owed_cache.discard(phone)
                task = asyncio.create_task(self._drop_owed(phone), name="owed-end-moot")
                self._delivering.add(task)
                task.add_done_callback(self._delivering.discard)

    async def _drop_owed(self, organization_phone_id: int) -> None:
        with contextlib.suppress(StoreUnavailable):
            end = await self._owed.take_owed(organization_phone_id)
            if end is not None:
                await self._owed.owed_dropped(end)
                log.info(
                    "a new login made an owed session.end moot",
                    extra={"fields": {"organizationPhoneId": organization_phone_id}},
                )

    async def _deliver_owed(self, connection: RuntimeConnection, organization_phone_id: int) -> None:
        try:
            end = await self._owed.take_owed(organization_phone_id)
        except StoreUnavailable:
            self.owed_cache.add(organization_phone_id)
            return
        if end is None:
            return
        delivered = False
        try:
            await asyncio.wait_for(
                self._command(
                    connection,
                    organization_phone_id,
                    lambda command_id: SessionEnd(
                        command_id=command_id, organization_phone_id=organization_phone_id, reason=end.reason,
                        detail=end.detail,
                    ),
                ),
                self._owed_timeout,
            )  # fmt: skip
            delivered = True
        except (SocketUnreachable, SocketCommandFailed, TimeoutError) as error:
            log.info("an owed session.end was not taken yet (%s); still owed", error)
        finally:
            with contextlib.suppress(StoreUnavailable):
                await self._owed.owed_done(end, delivered)
            if not delivered:
                self.owed_cache.add(organization_phone_id)
        if delivered:
            owner = self._owners.get(organization_phone_id)
            if owner is connection:  # the runtime ends that socket now: the sidecar forgets it
                del self._owners[organization_phone_id]
                connection.phones.discard(organization_phone_id)
            self._on_owed_delivered()
            log.info(
                "an owed session.end was delivered",
                extra={"fields": {"organizationPhoneId": organization_phone_id, "connection": connection.id}},
            )

    async def clear_cached_keys(self, organization_phone_id: int, key_prefixes: Sequence[str]) -> int | None:
        ack = await self._command(
            self._owners.get(organization_phone_id),
            organization_phone_id,
            lambda command_id: AuthClear(
                command_id=command_id, organization_phone_id=organization_phone_id, key_prefixes=list(key_prefixes)
            ),
        )
        return ack.keys_deleted

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
        self._to_release.discard(organization_phone_id)  # claimed again before its release went out
        return True

    def identified(self, connection: RuntimeConnection, runtime_id: str) -> list[int]:
        """The connection is runtime `runtime_id`: the phones that runtime held here (on a connection now gone, or
        another one of its own) are this connection's from now on. Returns them."""
        connection.key = runtime_id
        moved = sorted(self._away.pop(runtime_id, set()))
        for other in list(self._connections):
            if other is not connection and other.key == runtime_id:
                moved += [phone for phone in other.phones if self._owners.get(phone) is other]
        for phone in moved:
            previous = self._owners.get(phone)
            if previous is not None:
                previous.phones.discard(phone)
            self._owners[phone] = connection
            connection.phones.add(phone)
        return moved

    def disconnected(self, connection: RuntimeConnection) -> None:
        self._connections.discard(connection)
        released = [phone for phone in connection.phones if self._owners.get(phone) is connection]
        for phone in released:
            del self._owners[phone]
        if released and not connection.key.startswith("connection:"):  # a runtime id: it may come back
            self._away.setdefault(connection.key, set()).update(released)
        if released:
            self._release_leases_later(released)
        connection.phones.clear()
        for command_id, (owner, future) in list(self._commands.items()):
            if owner is connection and not future.done():
                future.set_exception(SocketUnreachable("runtime connection closed before it acknowledged"))
                del self._commands[command_id]

    def _release_leases_later(self, phones: list[int]) -> None:
        """Fleet mode: give the phones' leases back without holding up the caller (they expire otherwise). The
        phones given back while a release is under way go together in the next one: a storm's closes cost a
        statement per round trip, not one (and a pooled connection) per phone."""
        if self.leases is None:
            return
        self._to_release.update(phones)
        if self._releasing is None or self._releasing.done():
            self._releasing = asyncio.create_task(self._release_pending(self.leases))

    async def _release_pending(self, leases: SocketLeases) -> None:
        while self._to_release:
            phones = sorted(self._to_release)
            self._to_release.clear()
            with contextlib.suppress(StoreUnavailable):  # the leases expire by themselves
                await leases.release(phones)

    def all(self) -> list[RuntimeConnection]:
        return list(self._connections)

    async def close_all(self) -> None:
        for connection in list(self._connections):
            await connection.ws.close(code=1001, message=b"sidecar shutting down")
