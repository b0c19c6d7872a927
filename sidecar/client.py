"""Python SDK for runtimes: stream events to the sidecar's runtime link and obey its commands.

    async with RuntimeClient("ws://127.0.0.1:9464/v1/runtime", token=..., on_session_end=end) as link:
        await link.send(decrypt_error(1, 42, "79001112233@s.whatsapp.net", "Bad MAC", peer_jid=...))

Events are batched into frames (up to `batch_size` per frame). The client reconnects with exponential backoff
and jitter, and keeps up to `max_buffered` events while the sidecar is away: `send` waits for room, and
`send_nowait` drops (and counts) instead, so a runtime is never blocked by its sidecar unless it asks to be.
Commands reach the callbacks; the client acknowledges each one (ok=false with the error when a callback raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import random
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ParamSpec

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sidecar import __version__
from sidecar.events.contract import encode_hook
from sidecar.events.schema import (
    AccountRestriction,
    Activity,
    ConnectionUpdate,
    DecryptError,
    MessageRecovered,
    RuntimeInfo,
    Timestamp,
)

log = logging.getLogger("sidecar.client")
P = ParamSpec("P")

Command = dict[str, Any]
# A session.end or auth.clear handler may return how many keys it deleted (--key-store runtime): the ack says so.
CommandHandler = Callable[[Command], Awaitable[int | None] | int | None]
ProbeHandler = Callable[[Command], Awaitable[float] | float]
ErrorHandler = Callable[[dict[str, Any]], None]


def _now() -> Timestamp:
    return Timestamp.now(UTC)


def _frame(event: msgspec.Struct) -> dict[str, Any]:
    """An event as the link carries it: the schema's struct (events/schema.py), defaults left out."""
    built = msgspec.to_builtins(event, enc_hook=encode_hook)
    assert isinstance(built, dict)
    return built


def connection_update_event(
    organization_id: int,
    organization_phone_id: int,
    phone_jid: str,
    connection: str,
    status_code: int | None = None,
    new_login: bool = False,
) -> ConnectionUpdate:
    """The event as the schema's struct (sidecar/events/schema.py); `connection_update` gives its frame."""
    return ConnectionUpdate(
        organization_id=organization_id, organization_phone_id=organization_phone_id, phone_jid=phone_jid,
        connection=connection,  # type: ignore[arg-type]  # the sidecar names a bad state in its answer
        status_code=status_code, new_login=new_login, at=_now(),
    )  # fmt: skip


def decrypt_error_event(
    organization_id: int,
    organization_phone_id: int,
    phone_jid: str,
    error: str,
    *,
    source: str | None = None,
    peer_jid: str | None = None,
    message_type: str | None = None,
    collection: str | None = None,
    message_id: str | None = None,
) -> DecryptError:
    """`message_id`: the failed message's key id; a later `message_recovered` with it means it was not lost."""
    return DecryptError(
        organization_id=organization_id, organization_phone_id=organization_phone_id, phone_jid=phone_jid,
        error=error, peer_jid=peer_jid, collection=collection, message_id=message_id, at=_now(),
        # Passed as given: the sidecar names a bad value in its answer.
        source=source,  # type: ignore[arg-type]
        message_type=message_type,  # type: ignore[arg-type]
    )  # fmt: skip


def activity_event(
    organization_id: int,
    organization_phone_id: int,
    phone_jid: str,
    last_inbound_at: datetime | None,
    *,
    messages: int = 0,
    receipts: int = 0,
    notifications: int = 0,
) -> Activity:
    return Activity(
        organization_id=organization_id, organization_phone_id=organization_phone_id, phone_jid=phone_jid,
        last_inbound_at=(
            None if last_inbound_at is None else Timestamp.combine(last_inbound_at.date(), last_inbound_at.timetz())
        ),
        messages=messages, receipts=receipts, notifications=notifications, at=_now(),
    )  # fmt: skip


def message_recovered_event(
    organization_id: int, organization_phone_id: int, phone_jid: str, message_id: str, via: str = "retry"
) -> MessageRecovered:
    """A failed message arrived after all (`via`: retry, placeholder or other)."""
    return MessageRecovered(
        organization_id=organization_id, organization_phone_id=organization_phone_id, phone_jid=phone_jid,
        message_id=message_id, at=_now(),
        via=via,  # type: ignore[arg-type]  # passed as given: the sidecar names a bad value in its answer
    )  # fmt: skip


def _timestamp(value: datetime | None) -> Timestamp | None:
    return None if value is None else Timestamp.combine(value.date(), value.timetz())


def account_restriction_event(
    organization_id: int,
    organization_phone_id: int,
    phone_jid: str,
    kind: str,
    active: bool = True,
    *,
    until: datetime | None = None,
    code: int | None = None,
    detail: str | None = None,
) -> AccountRestriction:
    """What WhatsApp does to the number (`kind`: reachout_timelock, message_cap, ack_463, ack_479, temporary_ban,
    forbidden, client_outdated); `active=False` lifts it, `until` ends it by itself."""
    return AccountRestriction(
        organization_id=organization_id, organization_phone_id=organization_phone_id, phone_jid=phone_jid,
        kind=kind,  # type: ignore[arg-type]  # the sidecar names a bad kind in its answer
        active=active, until=_timestamp(until), code=code, detail=detail, at=_now(),
    )  # fmt: skip


def runtime_info_message(
    runtime_id: str | None = None,
    *,
    library: str | None = None,
    library_version: str | None = None,
    adapter_version: str | None = None,
) -> RuntimeInfo:
    """Who the runtime is: a connection's first frame. `library`/`library_version` apply to every session the
    connection reports (whatsapp_runtime_sessions, the advisory table)."""
    return RuntimeInfo(
        runtime_id=runtime_id, library=library, library_version=library_version, adapter_version=adapter_version
    )


def _framed(build: Callable[P, msgspec.Struct]) -> Callable[P, dict[str, Any]]:
    """The frame builder of an event builder: same arguments, the event as the link carries it."""

    @functools.wraps(build)
    def frame(*args: P.args, **kwargs: P.kwargs) -> dict[str, Any]:
        return _frame(build(*args, **kwargs))

    return frame


connection_update = _framed(connection_update_event)
decrypt_error = _framed(decrypt_error_event)
activity = _framed(activity_event)  # inbound traffic since the last report (one per interval, sessions with any)
account_restriction = _framed(account_restriction_event)
message_recovered = _framed(message_recovered_event)
runtime_info = _framed(runtime_info_message)


class Unsupported(Exception):
    """A command this runtime does not implement (acked `unsupported: …`)."""


class RuntimeClient:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        on_session_end: CommandHandler | None = None,
        on_auth_clear: CommandHandler | None = None,
        on_session_probe: ProbeHandler | None = None,
        on_session_restart: CommandHandler | None = None,
        on_error: ErrorHandler | None = None,
        batch_size: int = 100,
        max_buffered: int = 10_000,
        reconnect_initial: float = 0.2,
        reconnect_max: float = 10.0,
        runtime_id: str | None = None,
        max_unacked: int = 100_000,
        library: tuple[str, str] | None = None,
    ) -> None:
        """`runtime_id` names this runtime on the link (default: host, process and a random part, the same across
        this client's reconnects): every event gets a `seq`, is kept until the sidecar's `events.ack` covers it
        and is sent again after a reconnect (at most `max_unacked` kept; past that the oldest go, counted in
        `unacked_dropped`). `library`: the WhatsApp library and version this runtime runs (for example
        `("whatsmeow", "0.0.0-20261101")`), said in the connection's runtime.info."""
        self.url = url
        self.runtime_id = runtime_id or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        name, version = library or (None, None)
        self._info = runtime_info(self.runtime_id, library=name, library_version=version, adapter_version=__version__)
        self._seq = 0
        self._unacked: deque[tuple[int, dict[str, Any]]] = deque()
        self._max_unacked = max_unacked
        self._acked_ever = False  # a sidecar that never acknowledges (an older one) gets nothing twice
        self._settled = asyncio.Event()  # nothing buffered, nothing unacknowledged
        self._settled.set()
        self.unacked_dropped = 0
        self.resent = 0
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._handlers: dict[str, CommandHandler | ProbeHandler | None] = {
            "session.end": on_session_end,
            "auth.clear": on_auth_clear,
            "session.probe": on_session_probe,  # returns the round trip in milliseconds
            "session.restart": on_session_restart,
        }
        self._on_error = on_error
        self._batch_size = batch_size
        self._buffer: deque[dict[str, Any]] = deque()
        self._max_buffered = max_buffered
        self._room = asyncio.Event()
        self._room.set()
        self._has_events = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._reconnect_initial, self._reconnect_max = reconnect_initial, reconnect_max
        self._task: asyncio.Task[None] | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.dropped = 0
        self.connects = 0
        self.last_error: str | None = None
        self.errors: list[dict[str, Any]] = []

    async def __aenter__(self) -> RuntimeClient:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sidecar-runtime-client")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._commands):
            task.cancel()
        await asyncio.gather(*self._commands, return_exceptions=True)
        self.connected.clear()

    async def wait_connected(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a plain deadline reads best here
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def send(self, event: dict[str, Any]) -> None:
        """Queue one event; waits while `max_buffered` events are already waiting."""
        while len(self._buffer) >= self._max_buffered:
            self._room.clear()
            await self._room.wait()
        self._push(event)

    def send_nowait(self, event: dict[str, Any]) -> bool:
        """Queue one event, or drop it (False) when the buffer is full."""
        if len(self._buffer) >= self._max_buffered:
            self.dropped += 1
            return False
        self._push(event)
        return True

    async def flush(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every queued event was written to the link."""
        await asyncio.wait_for(self._empty.wait(), timeout)

    async def wait_acknowledged(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every queued event was written and acknowledged by the sidecar as durable."""
        await asyncio.wait_for(self._settled.wait(), timeout)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def unacknowledged(self) -> int:
        return len(self._unacked)

    def _push(self, event: dict[str, Any]) -> None:
        self._buffer.append(event)
        self._empty.clear()
        self._settled.clear()
        self._has_events.set()

    def _stamped(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event with its seq, kept until acknowledged."""
        self._seq += 1
        stamped = {**event, "seq": self._seq}
        if len(self._unacked) >= self._max_unacked:
            self._unacked.popleft()
            if self._acked_ever:
                self.unacked_dropped += 1
        self._unacked.append((self._seq, stamped))
        return stamped

    def _acknowledged(self, up_to: int) -> None:
        self._acked_ever = True
        while self._unacked and self._unacked[0][0] <= up_to:
            self._unacked.popleft()
        if not self._unacked and not self._buffer:
            self._settled.set()

    async def _run(self) -> None:
        delay = self._reconnect_initial
        while True:
            try:
                async with connect(self.url, additional_headers=self._headers, max_size=8 * 1024 * 1024) as ws:
                    self.connects += 1
                    self.last_error = None
                    self.connected.set()
                    delay = self._reconnect_initial
                    await self._pump(ws)
            except asyncio.CancelledError:
                raise
            except InvalidStatus as error:
                self.last_error = f"sidecar refused the connection: HTTP {error.response.status_code}"
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as error:
                self.last_error = f"{type(error).__name__}: {error}"
            self.connected.clear()
            log.warning("runtime link down (%s); retrying in %.1fs", self.last_error, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._reconnect_max)

    async def _pump(self, ws: ClientConnection) -> None:
        receiver = asyncio.create_task(self._receive(ws))
        try:
            await ws.send(json.dumps(self._info))
            if self._acked_ever:  # what the last connection took but never acknowledged, in order
                pending = [event for _, event in self._unacked]
                for start in range(0, len(pending), self._batch_size):
                    batch = pending[start : start + self._batch_size]
                    await ws.send(json.dumps(batch[0] if len(batch) == 1 else batch))
                self.resent += len(pending)
            while not receiver.done():
                if not self._buffer:
                    self._empty.set()
                    self._has_events.clear()
                    waiter = asyncio.create_task(self._has_events.wait())
                    await asyncio.wait({waiter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                count = min(self._batch_size, len(self._buffer))
                batch = [self._stamped(self._buffer.popleft()) for _ in range(count)]
                self._room.set()
                # Kept (unacknowledged) from here on: a failed send is resent on the next connection.
                try:
                    await ws.send(json.dumps(batch[0] if count == 1 else batch))
                except BaseException:
                    if not self._acked_ever:  # a sidecar without acks: the batch goes first on the next one
                        for _ in range(count):
                            self._unacked.pop()
                        self._buffer.extendleft(reversed([{k: v for k, v in e.items() if k != "seq"} for e in batch]))
                    raise
            await receiver  # re-raises what ended the connection
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await receiver

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                message = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(message, dict):
                continue
            kind = message.get("type")
            if kind == "events.ack" and isinstance(message.get("upTo"), int):
                self._acknowledged(message["upTo"])
            elif kind == "error":
                self.errors.append(message)
                if self._on_error is not None:
                    self._on_error(message)
            elif kind in self._handlers or "commandId" in message:  # a command this SDK does not know: refused
                task = asyncio.create_task(self._obey(ws, message))
                self._commands.add(task)
                task.add_done_callback(self._commands.discard)

    async def _obey(self, ws: ClientConnection, command: Command) -> None:
        kind = str(command.get("type"))
        handler = self._handlers.get(kind)
        ok, error, result = True, None, None
        try:
            if kind not in self._handlers or (handler is None and kind == "session.probe"):
                # Protocol v1's convention: "unsupported: …" tells the sidecar this runtime lacks the command.
                raise Unsupported(f"unsupported: {kind} (no handler in this runtime)")
            if handler is not None:
                result = handler(command)
                if inspect.isawaitable(result):
                    result = await result
        except Unsupported as unsupported:
            ok, error = False, str(unsupported)
        except Exception as failure:
            ok, error = False, f"{type(failure).__name__}: {failure}"
        ack: dict[str, Any] = {"type": "command.ack", "commandId": command.get("commandId"), "ok": ok, "error": error}
        if ok and command.get("type") == "session.probe" and isinstance(result, int | float):
            ack["roundTripMs"] = float(result)
        elif ok and kind in ("session.end", "auth.clear") and isinstance(result, int) and not isinstance(result, bool):
            ack["keysDeleted"] = result  # --key-store runtime: the handler deleted this many keys itself
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(ack))
