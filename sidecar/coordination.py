"""How this replica coordinates with others: alone (decisions and sockets in this process) or as one of a fleet
through PostgreSQL (shared decisions, socket leases, routed commands). The app factory asks it for the parts that
differ, instead of asking whether there is a fleet."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from sidecar.config import Config
from sidecar.link.connections import LinkConnections
from sidecar.link.fleet_sockets import FleetSockets
from sidecar.link.sequences import SharedSequences
from sidecar.ports import OwedEnds, SessionStore, SocketLeases, StoreUnavailable
from sidecar.runtime import Fleet
from sidecar.runtime.waiting import waiting_from_json, waiting_to_json
from sidecar.store.database_clock import DatabaseClock
from sidecar.store.journal import EVENTS_FILE, Journal
from sidecar.store.leases import LEASE_SECONDS, PostgresLeases
from sidecar.store.postgres import PostgresStore
from sidecar.store.shared_decisions import PostgresFleet

log = logging.getLogger("sidecar.fleet")

Tasks = dict[str, Callable[[], Awaitable[None]]]


class Coordination(Protocol):
    @property
    def leases(self) -> SocketLeases | None:
        """Socket ownership shared with the other replicas (None: this replica's connections are all there is)."""
        ...

    @property
    def owed_ends(self) -> OwedEnds | None:
        """Where ends owed to absent runtimes are kept (None: in this process)."""
        ...

    @property
    def sequences(self) -> SharedSequences | None:
        """Each runtime id's acknowledged events, shared with the other replicas (None: this replica's own)."""
        ...

    def sockets(self, link: LinkConnections) -> LinkConnections | FleetSockets:
        """The socket controller (and the liveness watch's probe) over this replica's link."""
        ...

    def fleet(self, on_dropped: Callable[[str], None], on_decided: Callable[[], None] | None) -> Fleet | None:
        """The fleet's shared decision state for the runtime's assembly (None: decisions stay here)."""
        ...

    def clock(self, local: Callable[[], datetime]) -> Callable[[], datetime]:
        """The clock for times other replicas compare (PostgreSQL's in a fleet; the local one alone)."""
        ...

    @property
    def clock_ahead(self) -> float:
        """Seconds this replica's clock is ahead of the shared one (0 alone)."""
        ...

    async def start(self) -> None:
        """Before the first decision (a fleet measures the database's clock; an outage does not stop it)."""
        ...

    def background(self, stop: asyncio.Event) -> Tasks: ...

    def close(self) -> None: ...


class Alone:
    leases = None
    sequences = None
    owed_ends = None
    clock_ahead = 0.0

    def clock(self, local: Callable[[], datetime]) -> Callable[[], datetime]:
        return local

    async def start(self) -> None:
        return None

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
        self._instance = config.instance
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
        self._store = store
        self._clock: DatabaseClock | None = None

    def clock(self, local: Callable[[], datetime]) -> DatabaseClock:
        self._clock = DatabaseClock(self._store, local)
        return self._clock

    @property
    def clock_ahead(self) -> float:
        return self._clock.ahead if self._clock is not None else 0.0

    @property
    def sequences(self) -> PostgresLeases:
        return self.leases

    @property
    def owed_ends(self) -> PostgresLeases:
        return self.leases

    async def start(self) -> None:
        try:
            if released := await self.leases.release_predecessors(self._instance):
                log.info("released %d socket leases an earlier process of this instance left", released)
        except StoreUnavailable as error:
            log.warning("cannot release an earlier process's socket leases yet (%s); they expire", error)
        if self._clock is not None:
            try:
                await self._clock.measure()
            except StoreUnavailable as error:
                log.warning("cannot measure PostgreSQL's clock yet (%s); measured once it answers", error)

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
        if self._clock is not None:
            tasks["clock-offset"] = self._clock.follow
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
