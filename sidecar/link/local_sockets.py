"""An in-process socket controller: a runtime living in the same process registers each session's socket."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sidecar.ports import SocketUnreachable


class LocalSocket(Protocol):
    async def end(self, reason: str) -> None: ...

    async def clear_keys(self, key_prefixes: Sequence[str]) -> None: ...


class LocalSocketController:
    def __init__(self) -> None:
        self._sockets: dict[int, LocalSocket] = {}

    def register(self, organization_phone_id: int, socket: LocalSocket) -> None:
        self._sockets[organization_phone_id] = socket

    def unregister(self, organization_phone_id: int) -> None:
        self._sockets.pop(organization_phone_id, None)

    @property
    def registered(self) -> int:
        return len(self._sockets)

    async def end_session(self, organization_phone_id: int, reason: str, detail: str) -> int | None:
        # The sidecar forgets the socket whether or not ending it works: a close never leaks a map entry.
        socket = self._sockets.pop(organization_phone_id, None)
        if socket is None:
            raise SocketUnreachable(f"no socket registered for organizationPhoneId {organization_phone_id}")
        await socket.end(detail)
        return None

    async def clear_cached_keys(self, organization_phone_id: int, key_prefixes: Sequence[str]) -> int | None:
        socket = self._sockets.get(organization_phone_id)
        if socket is None:
            raise SocketUnreachable(f"no socket registered for organizationPhoneId {organization_phone_id}")
        await socket.clear_keys(key_prefixes)
        return None

    async def probe_session(self, organization_phone_id: int) -> float:
        """A socket with a `probe()` coroutine (milliseconds) can be probed; others are unreachable for probes."""
        probe = getattr(self._sockets.get(organization_phone_id), "probe", None)
        if probe is None:
            raise SocketUnreachable(f"no probing socket registered for organizationPhoneId {organization_phone_id}")
        return float(await probe())

    async def restart_session(self, organization_phone_id: int, reason: str, detail: str) -> None:
        restart = getattr(self._sockets.get(organization_phone_id), "restart", None)
        if restart is None:
            raise SocketUnreachable(f"no restartable socket registered for organizationPhoneId {organization_phone_id}")
        await restart(detail)
