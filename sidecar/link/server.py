"""The sidecar's side of the runtime link: `GET /v1/runtime` (WebSocket). Each text frame is decoded whole and
handed to the intake; the phones its events report are claimed for the connection (commands go there)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from aiohttp import WSMsgType, web

from sidecar.events.decode import parse_frame
from sidecar.events.intake import Channel, Intake
from sidecar.events.reader import FrameInvalid
from sidecar.events.schema import ConnectionUpdate, EventsAck, LinkError, SessionEvent
from sidecar.link.connections import LinkConnections, RuntimeConnection
from sidecar.link.sequences import LinkSequences, fresh, runtime_info
from sidecar.ports import SocketLeases, StoreUnavailable
from sidecar.rules.versions import library_name
from sidecar.runtime import SessionRuntime

log = logging.getLogger("sidecar.link")

MAX_FRAME_BYTES = 4 * 1024 * 1024
ACK_INTERVAL_SECONDS = 0.005  # at most one events.ack per connection this often
HEARTBEAT_SECONDS = 30.0
CONFIRM_MARGIN_SECONDS = 1.0  # past the lease: a dead replica's last heartbeat has certainly run out


class LinkServer:
    def __init__(
        self, connections: LinkConnections, intake: Intake, runtime: SessionRuntime, sequences: LinkSequences
    ) -> None:
        self._connections = connections
        self._intake = intake
        self._runtime = runtime
        self._sequences = sequences
        self.lease_conflicts = 0
        self._confirming: set[asyncio.Task[None]] = set()  # lost claims, tried again once a lease could end

    async def handle_frame(self, connection: RuntimeConnection, text: str) -> int:
        """Validate a whole frame, then hand it to the intake. Returns how many events were applied."""
        try:
            messages = parse_frame(text)
        except FrameInvalid as invalid:
            self._intake.rejected(invalid.reason)
            await connection.ws.send_json(msgspec.to_builtins(invalid.answer()))
            return 0
        info = runtime_info(messages)
        if info is not None and info.runtime_id is not None and info.runtime_id != connection.key:
            await self._identified(connection, info.runtime_id)
        if info is not None and info.library is not None and info.library_version is not None:
            connection.runtime = (library_name(info.library), info.library_version)
        messages, top = fresh(messages, self._sequences.progress(connection.key))
        events = await self._intake.admit(messages, Channel.WEBSOCKET)
        claimed = self._claim(connection, events)
        origin = (connection.key, top) if top is not None and not connection.key.startswith("connection:") else None
        applied = await self._intake.apply(events, origin)
        if claimed and self._connections.leases is not None:
            await self._claim_leases(connection, claimed)
        if top is not None:
            connection.sequenced = True
            self._acknowledge_later(connection, top)
        if self._connections.owed_cache and events:
            self._owed_shown(connection, events)
        return applied

    def _owed_shown(self, connection: RuntimeConnection, events: list[SessionEvent]) -> None:
        """Phones with an owed end whose old session is still in use here (an error, traffic, an `open` that is
        not a new login) get it now; a new login (a fresh QR pairing) makes it moot, and it is dropped."""
        owed = self._connections.owed_cache
        still_used: list[int] = []
        paired: list[int] = []
        for event in events:
            phone = event.organization_phone_id
            if phone not in owed:
                continue
            if type(event) is ConnectionUpdate:
                if event.connection == "open":
                    (paired if event.new_login else still_used).append(phone)
            else:
                still_used.append(phone)
        self._connections.deliver_owed_later(connection, still_used)
        self._connections.drop_owed_later(paired)

    async def _identified(self, connection: RuntimeConnection, runtime_id: str) -> None:
        """A `runtime.info`: the runtime's sequence numbers, and the phones it held here before (their leases
        taken again, the ends owed for them delivered)."""
        self._sequences.forget_connection(connection.key)
        moved = self._connections.identified(connection, runtime_id)
        await self._sequences.identified(runtime_id)
        leases = self._connections.leases
        if moved and leases is not None:
            with contextlib.suppress(StoreUnavailable):  # taken again with the phone's next claim otherwise
                await leases.claim_many([(phone, connection.id) for phone in moved])
        self._connections.deliver_owed_later(connection, moved)

    def _acknowledge_later(self, connection: RuntimeConnection, top: int) -> None:
        """`events.ack` once what this frame brought is durable; in order, without holding up the reading."""
        connection.acks.put_nowait((self._runtime.decider.durable_mark(), top))
        if connection.acknowledger is None or connection.acknowledger.done():
            connection.acknowledger = asyncio.create_task(self._acknowledge(connection), name="link-acks")

    async def _acknowledge(self, connection: RuntimeConnection) -> None:
        while True:
            mark, top = await connection.acks.get()
            if not connection.draining:
                await asyncio.sleep(ACK_INTERVAL_SECONDS)  # frames meanwhile are covered by the same ack
            while not connection.acks.empty():  # later frames' marks and seqs are higher: one ack covers all
                connection.acks.task_done()
                mark, top = connection.acks.get_nowait()
            try:
                await self._runtime.decider.until_durable(mark)
                await self._sequences.acknowledged(connection.key, top)  # shared first: an ack implies it is known
                await connection.ws.send_json(msgspec.to_builtins(EventsAck(up_to=top)))
            except ConnectionError:
                return  # the runtime resends what was not acknowledged
            finally:
                connection.acks.task_done()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - one deadline for every connection
        """Stopping (SIGTERM): take no more frames, finish the ones in progress and acknowledge what they brought
        once durable, within `timeout`; frames not taken are resent by the runtime to whoever serves it next."""
        connections = self._connections.all()
        for connection in connections:
            connection.draining = True

        async def drained(connection: RuntimeConnection) -> None:
            await connection.idle.wait()
            await connection.acks.join()

        try:
            await asyncio.wait_for(asyncio.gather(*(drained(c) for c in connections)), timeout)
        except TimeoutError:
            log.warning("stopping before every taken event was acknowledged; the runtimes resend the rest")
        for connection in connections:
            if connection.acknowledger is not None:
                connection.acknowledger.cancel()
        for task in list(self._confirming):
            task.cancel()

    def _claim(self, connection: RuntimeConnection, events: list[SessionEvent]) -> list[SessionEvent]:
        """Ownership follows the runtime's reports, but a phone the sidecar just closed is not re-claimed by its
        own late errors; only an `open` (a new login) claims it again. Claiming before the frame is applied
        claims what claiming before each event would: the first event of a phone that is not closed, or its
        first `open` (events of a closed phone other than `open` do not reopen it). Returns the new claims."""
        claimed: list[SessionEvent] = []
        owner_of, is_closed = self._connections.owner_of, self._runtime.is_closed
        for event in events:
            phone = event.organization_phone_id
            if owner_of(phone) is connection:
                continue  # the common case, kept cheap: this connection owns the phone already
            reopening = type(event) is ConnectionUpdate and event.connection == "open"
            if (reopening or not is_closed(phone)) and self._connections.claim(connection, phone):
                claimed.append(event)
        return claimed

    async def _claim_leases(self, connection: RuntimeConnection, claimed: list[SessionEvent]) -> None:
        """Fleet mode: the phones' leases, the frame's new claims in one statement; a phone held by another live
        replica means two runtimes share one set of credentials (what makes WhatsApp answer 440 `conflict` in a
        loop): an incident at once."""
        leases = self._connections.leases
        assert leases is not None
        try:
            held = await leases.claim_many([(event.organization_phone_id, connection.id) for event in claimed])
        except StoreUnavailable:
            return  # not recorded: the phone's next claim (its next connection) records it
        lost = [event for event in claimed if event.organization_phone_id in held]
        if lost:
            task = asyncio.create_task(self._claim_again(connection, lost, leases), name="lease-confirm")
            self._confirming.add(task)
            task.add_done_callback(self._confirming.discard)

    async def _claim_again(self, connection: RuntimeConnection, lost: list[SessionEvent], leases: SocketLeases) -> None:
        """A claim lost to another replica is tried again once that replica's lease could have ended: a replica
        that died (its runtimes moved here) has stopped renewing by then, and its phones become this one's; a
        phone still held after that is held by a live replica, and two runtimes share its credentials."""
        await asyncio.sleep(leases.lease_seconds + CONFIRM_MARGIN_SECONDS)
        still = [e for e in lost if self._connections.owner_of(e.organization_phone_id) is connection]
        if not still or connection.ws.closed:
            return
        try:
            held = await leases.claim_many([(event.organization_phone_id, connection.id) for event in still])
        except StoreUnavailable:
            return
        for event in still:
            holder = held.get(event.organization_phone_id)
            if holder is None:
                continue
            self.lease_conflicts += 1
            await self._runtime.report_credentials_conflict(
                event.organization_id,
                event.organization_phone_id,
                event.phone_jid,
                {"otherReplica": holder, "replica": leases.instance},
            )

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=HEARTBEAT_SECONDS)
        await ws.prepare(request)
        connection = self._connections.connected(ws, request.remote or "unknown")
        log.info("runtime connected", extra={"fields": {"connection": connection.id, "peer": connection.peer}})
        try:
            async for message in ws:
                if connection.draining and connection.sequenced:
                    continue  # not taken, not acknowledged: the runtime sends it again after its reconnect
                if message.type is WSMsgType.TEXT:
                    connection.idle.clear()
                    try:
                        await self.handle_frame(connection, message.data)
                    finally:
                        connection.idle.set()
                    # Frames already buffered are read without suspending; yield so that a busy runtime
                    # cannot starve the HTTP API, the other connections and the effects in flight.
                    await asyncio.sleep(0)
                elif message.type is WSMsgType.BINARY:
                    self._intake.rejected("binary")
                    refusal = LinkError(error="binary frames are not accepted; send JSON text")
                    await ws.send_json(msgspec.to_builtins(refusal))
                elif message.type is WSMsgType.ERROR:
                    log.warning("runtime connection error: %s", ws.exception())
        except ConnectionResetError as error:  # the runtime (or a proxy) went away mid-frame: routine, no traceback
            fields = {"connection": connection.id, "error": str(error) or type(error).__name__}
            log.info("runtime connection reset", extra={"fields": fields})
        finally:
            if connection.acknowledger is not None:
                connection.acknowledger.cancel()
            self._sequences.forget_connection(connection.key)
            self._connections.disconnected(connection)
            log.info("runtime disconnected", extra={"fields": {"connection": connection.id}})
        return ws
