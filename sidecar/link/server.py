"""The sidecar's side of the runtime link: `GET /v1/runtime` (WebSocket) and the SocketController over it.

Commands go to the connection that last reported a session. A command waits for its `command.ack`; the
connection closing first, or no connection owning the session, makes it SocketUnreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from sidecar.link.dispatch import apply_events
from sidecar.link.protocol import (
    Activity,
    CommandAck,
    ConnectionUpdate,
    DecryptError,
    FrameInvalid,
    InboundMessage,
    SessionEvent,
)
from sidecar.link.wire import parse_frame
from sidecar.ports import (
    SocketLeases,
    SocketUnreachable,
    StoreUnavailable,
    command_failure,
)
from sidecar.runtime import SessionRuntime
from sidecar.runtime.liveness import RESTART_STATUS
from sidecar.telemetry.metrics import SidecarMetrics

EVENT_NAMES = {
    CommandAck: "command.ack",
    ConnectionUpdate: "connection.update",
    DecryptError: "decrypt.error",
    Activity: "activity",
}

log = logging.getLogger("sidecar.link")

MAX_FRAME_BYTES = 4 * 1024 * 1024
HEARTBEAT_SECONDS = 30.0
_connection_ids = itertools.count(1)


@dataclass(eq=False)
class RuntimeConnection:
    ws: web.WebSocketResponse
    peer: str
    id: int = field(default_factory=lambda: next(_connection_ids))
    phones: set[int] = field(default_factory=set)


class RuntimeLink:
    """Tracks runtime connections and which one owns each session; sends commands and matches their acks."""

    def __init__(self) -> None:
        self.runtime: SessionRuntime | None = None
        # Waited on before each frame: the database writer's admission (sidecar.store.pending.caught_up).
        self.admission: Callable[[], Awaitable[None]] | None = None
        self._connections: set[RuntimeConnection] = set()
        self._owners: dict[int, RuntimeConnection] = {}
        self._commands: dict[str, tuple[RuntimeConnection, asyncio.Future[CommandAck]]] = {}
        self.frames_rejected = 0
        self.ownership_changes = 0
        self.metrics: SidecarMetrics | None = None
        self._event_children: dict[tuple[type, str], Any] = {}
        self.leases: SocketLeases | None = None  # fleet mode: socket ownership shared through PostgreSQL
        self.lease_conflicts = 0
        self._releases: set[asyncio.Task[None]] = set()

    def rejected(self, reason: str) -> None:
        self.frames_rejected += 1
        if self.metrics is not None:
            self.metrics.events_rejected.labels(reason).inc()

    def accept(self, messages: Sequence[InboundMessage], channel: str) -> list[SessionEvent]:
        """A validated batch taken in: counted, its acknowledgements applied at once (closes in flight wait for
        them); returns its session events, in order."""
        self.counted_all(messages, channel)
        events: list[SessionEvent] = []
        for message in messages:
            if isinstance(message, CommandAck):
                self.acknowledge(message)
            else:
                events.append(message)
        return events

    def counted_all(self, messages: Sequence[InboundMessage], channel: str) -> None:
        """whatsapp_sidecar_events_total, incremented once per message type of the batch."""
        if self.metrics is not None:
            for kind, count in Counter(type(message) for message in messages).items():
                child = self._event_children.get((kind, channel))
                if child is None:
                    name = EVENT_NAMES[kind]
                    child = self._event_children[(kind, channel)] = self.metrics.events.labels(name, channel)
                child.inc(count)

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
            {"type": "session.end", "reason": reason, "detail": detail, "logout": True},
        )

    async def clear_cached_keys(self, organization_phone_id: int, key_prefixes: Sequence[str]) -> None:
        await self._command(
            self._owners.get(organization_phone_id),
            organization_phone_id,
            {"type": "auth.clear", "keyPrefixes": list(key_prefixes)},
        )

    async def probe_session(self, organization_phone_id: int) -> float:
        started = time.perf_counter()
        ack = await self._command(
            self._owners.get(organization_phone_id), organization_phone_id, {"type": "session.probe"}
        )
        # The runtime's own measure of the round trip with WhatsApp; ours (it includes the link) if it gave none.
        return ack.round_trip_ms if ack.round_trip_ms is not None else (time.perf_counter() - started) * 1000

    async def restart_session(self, organization_phone_id: int, reason: str, detail: str) -> None:
        await self._command(
            self._owners.get(organization_phone_id),
            organization_phone_id,
            {"type": "session.restart", "reason": reason, "detail": detail, "statusCode": RESTART_STATUS},
        )

    async def _command(
        self, connection: RuntimeConnection | None, organization_phone_id: int, body: dict[str, Any]
    ) -> CommandAck:
        if connection is None or connection.ws.closed:
            raise SocketUnreachable(f"no runtime connection owns organizationPhoneId {organization_phone_id}")
        command_id = uuid.uuid4().hex
        future: asyncio.Future[CommandAck] = asyncio.get_running_loop().create_future()
        self._commands[command_id] = (connection, future)
        try:
            frame = {"type": body["type"], "commandId": command_id, "organizationPhoneId": organization_phone_id}
            await connection.ws.send_json({**frame, **body})
            return await future
        except ConnectionError as error:
            raise SocketUnreachable(f"runtime connection lost: {error}") from error
        finally:
            self._commands.pop(command_id, None)

    # Connections --------------------------------------------------------------------------------------

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

    def _claim(self, connection: RuntimeConnection, organization_phone_id: int) -> bool:
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

    async def _claim_lease(self, connection: RuntimeConnection, message: SessionEvent) -> None:
        """Fleet mode: the phone's lease; a live lease held by another replica means two runtimes share one
        set of credentials (what makes WhatsApp answer 440 `conflict` in a loop): an incident at once."""
        assert self.leases is not None and self.runtime is not None
        try:
            holder = await self.leases.claim(message.organization_phone_id, connection.id)
        except StoreUnavailable:
            return  # the heartbeat keeps trying for the phones this replica holds
        if holder is not None:
            self.lease_conflicts += 1
            await self.runtime.report_credentials_conflict(
                message.organization_id,
                message.organization_phone_id,
                message.phone_jid,
                {"otherReplica": holder, "replica": self.leases.instance},
            )

    async def handle_frame(self, connection: RuntimeConnection, text: str) -> int:
        """Validate a whole frame, then apply it in order. Returns how many events were applied."""
        try:
            messages = parse_frame(text)
        except FrameInvalid as invalid:
            self.rejected(invalid.reason)
            await connection.ws.send_json({"type": "error", **invalid.to_json()})
            return 0
        assert self.runtime is not None
        events = self.accept(messages, "websocket")
        if self.admission is not None and events:
            await self.admission()  # events wait for the database writer; not reading meanwhile, TCP pushes back
        claimed: list[SessionEvent] = []
        owners = self._owners
        for message in events:
            if owners.get(message.organization_phone_id) is connection:
                continue  # the common case, kept cheap: this connection owns the phone already
            # Ownership follows the runtime's reports, but a phone the sidecar just closed is not re-claimed by
            # its own late errors; only an `open` (a new login) claims it again. Claiming before the frame is
            # applied claims what claiming before each event would: the first event of a phone that is not
            # closed, or its first `open` (events of a closed phone other than `open` do not reopen it).
            reopening = isinstance(message, ConnectionUpdate) and message.connection == "open"
            if (reopening or not self.runtime.is_closed(message.organization_phone_id)) and self._claim(
                connection, message.organization_phone_id
            ):
                claimed.append(message)
        # A frame is decided as one batch, after the batches handed over before it (one decider per replica).
        async with self.runtime.batch():
            applied = await apply_events(self.runtime, events)
        if self.leases is not None:
            for message in claimed:
                await self._claim_lease(connection, message)
        return applied

    def _disconnected(self, connection: RuntimeConnection) -> None:
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

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=HEARTBEAT_SECONDS)
        await ws.prepare(request)
        connection = RuntimeConnection(ws, request.remote or "unknown")
        self._connections.add(connection)
        log.info("runtime connected", extra={"fields": {"connection": connection.id, "peer": connection.peer}})
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await self.handle_frame(connection, message.data)
                    # Frames already buffered are read without suspending; yield so that a busy runtime
                    # cannot starve the HTTP API, the other connections and the effects in flight.
                    await asyncio.sleep(0)
                elif message.type is WSMsgType.BINARY:
                    self.rejected("binary")
                    await ws.send_json({"type": "error", "error": "binary frames are not accepted; send JSON text"})
                elif message.type is WSMsgType.ERROR:
                    log.warning("runtime connection error: %s", ws.exception())
        finally:
            self._disconnected(connection)
            log.info("runtime disconnected", extra={"fields": {"connection": connection.id}})
        return ws

    def _release_leases_later(self, phones: list[int]) -> None:
        """Fleet mode: give the phones' leases back without holding up the caller (they expire otherwise)."""
        if self.leases is not None:
            task = asyncio.create_task(self._release_leases(phones))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release_leases(self, phones: list[int]) -> None:
        assert self.leases is not None
        with contextlib.suppress(StoreUnavailable):  # the leases expire by themselves
            await self.leases.release(phones)

    async def close_all(self) -> None:
        for connection in list(self._connections):
            await connection.ws.close(code=1001, message=b"sidecar shutting down")
