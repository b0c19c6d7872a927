"""How this replica coordinates with others: alone (decisions and sockets in this process) or as one of a fleet
through PostgreSQL (shared decisions, socket leases, routed commands). The app factory asks it for the parts that
differ, instead of asking whether there is a fleet."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from sidecar.config import Config
from sidecar.link.connections import LinkConnections
from sidecar.link.fleet_sockets import FleetSockets
from sidecar.ports import SessionStore, SocketLeases
from sidecar.runtime import Fleet
from sidecar.runtime.waiting import waiting_from_json, waiting_to_json
from sidecar.store.journal import EVENTS_FILE, Journal
from sidecar.store.leases import LEASE_SECONDS, PostgresLeases
from sidecar.store.postgres import PostgresStore
from sidecar.store.shared_decisions import PostgresFleet

Tasks = dict[str, Callable[[], Awaitable[None]]]


class Coordination(Protocol):
    @property
    def leases(self) -> SocketLeases | None:
        """Socket ownership shared with the other replicas (None: this replica's connections are all there is)."""
        ...

    def sockets(self, link: LinkConnections) -> LinkConnections | FleetSockets:
        """The socket controller (and the liveness watch's probe) over this replica's link."""
        ...

    def fleet(self, on_dropped: Callable[[str], None], on_decided: Callable[[], None] | None) -> Fleet | None:
        """The fleet's shared decision state for the runtime's assembly (None: decisions stay here)."""
        ...

    def background(self, stop: asyncio.Event) -> Tasks: ...

    def close(self) -> None: ...


class Alone:
    leases = None

    def sockets(self, link: LinkConnections) -> LinkConnections:
        return link

    def fleet(self, on_dropped: Callable[[str], None], on_decided: Callable[[], None] | None) -> None:
        return None

    def background(self, stop: asyncio.Event) -> Tasks:
        return {}

    def close(self) -> None:
        return None


class ThroughPostgres:
    def __init__(self, config: Config, store: PostgresStore, database_url: str) -> None:
        # One process, one lease holder: a restarted replica never inherits a dead process's connections.
        replica_id = f"{config.instance}/{uuid.uuid4().hex[:8]}"
        self._decisions = PostgresFleet(store, config.breaker, replica_id, config.close_lease_seconds)
        self.leases: PostgresLeases = PostgresLeases(store, replica_id)
        self._journal: Journal[Any] | None = (
            Journal(config.state_dir, EVENTS_FILE, waiting_to_json, waiting_from_json, suffix=":events")
            if config.state_dir is not None
            else None
        )
        self._backlog_limit = config.pending_steps_limit
        self._url = database_url
        # Behind PgBouncer in transaction mode a LISTEN gets no server connection of its own: poll only.
        self._listen = config.database_pooler != "transaction"
        self._sockets: FleetSockets | None = None

    def sockets(self, link: LinkConnections) -> FleetSockets:
        self._sockets = FleetSockets(link, self.leases, LEASE_SECONDS)
        return self._sockets

    def fleet(self, on_dropped: Callable[[str], None], on_decided: Callable[[], None] | None) -> Fleet:
        return Fleet(self._decisions, self._backlog_limit, self._journal, on_dropped, on_decided)

    def background(self, stop: asyncio.Event) -> Tasks:
        routed = self._sockets
        assert routed is not None, "sockets() first: the tasks deliver through them"
        tasks: Tasks = {
            "routed-commands": lambda: routed.deliver_routed(stop),
            "lease-heartbeat": lambda: routed.heartbeat(stop),
        }
        if self._listen:
            tasks["lease-listener"] = lambda: self.leases.listen(self._url, routed.wake, stop)
        return tasks

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()


def coordination_for(config: Config, store: SessionStore) -> Coordination:
    if config.fleet_mode and isinstance(store, PostgresStore) and config.database_url is not None:
        return ThroughPostgres(config, store, config.database_url)
    return Alone()
