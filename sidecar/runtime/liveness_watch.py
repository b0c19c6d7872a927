"""The liveness watch as the runtime carries it out: per session the pure state of rules/liveness.py, fed by the
runtime's `activity` reports and connection updates, ticked by a supervised task; probes through the runtime
link; a deaf session is an incident (record, metric, `session.deaf` webhook) and, with `--deaf-action restart`,
a `session.restart` command: never a logout, never a key deletion. Restarts pass their own circuit breaker (the
fleet breaker's settings; Safety.restarts), so a WhatsApp-side outage that silences every session at once is
held and paged, not turned into a restart storm. Observe mode records what it would have done.

The watch lives where a session's runtime connection is: in fleet mode that is the replica holding its lease
(activity arrives there), so each replica watches the sessions it holds and counts its own restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.ports import LivenessSockets, SocketCommandFailed, SocketCommandUnsupported, SocketUnreachable
from sidecar.rules.liveness import (
    Action,
    DeafAction,
    Liveness,
    LivenessConfig,
    Status,
    on_activity,
    on_connection,
    on_probe,
    on_tick,
    silence,
    threshold,
)
from sidecar.rules.records import NotificationEvent, PhoneRef
from sidecar.rules.safety import IncidentKind
from sidecar.runtime.incidents import Incidents
from sidecar.runtime.outcomes import socket_command
from sidecar.runtime.parts import RuntimeParts

log = logging.getLogger("sidecar.runtime.liveness")

TICK_SECONDS = 5.0
RESTART_STATUS = 515  # DisconnectReason.restartRequired: backends reconnect on anything but 401


@dataclass
class Watched:
    phone: PhoneRef
    state: Liveness
    probe_ms: float | None = None
    unprobed: bool = False  # its runtime does not implement session.probe: the confirmation window stands in


class LivenessWatch:
    def __init__(
        self,
        parts: RuntimeParts,
        incidents: Incidents,
        config: LivenessConfig,
        action: DeafAction,
        sockets: LivenessSockets | None,
    ) -> None:
        self.config = config
        self.action = action
        self._sockets = sockets
        self._safety = parts.safety
        self._incidents = incidents
        self._tasks = parts.tasks
        self._now = parts.now
        self._registry = parts.registry
        self._is_closed = parts.registry.is_closed
        self._socket_timeout = parts.socket_timeout
        self._watched: dict[int, Watched] = {}
        self._troubled: dict[int, Status] = {}  # the watched sessions whose status is not OK (kept as it changes)
        self.restarts = 0
        self.restarts_held = 0

    # Inputs -------------------------------------------------------------------------------------------

    def activity(self, phone: PhoneRef, last_inbound_at: float) -> None:
        watched = self._watch(phone)
        if not watched.state.connected:  # traffic means connected (a report that beat the open, or a restart)
            watched.state = on_connection(watched.state, self._now(), True)
        previous = watched.state.last_inbound
        watched.state, action = on_activity(watched.state, last_inbound_at, self.config)
        self._troubled.pop(phone.organization_phone_id, None)  # traffic: the status is OK again
        if action is Action.RECOVERED:
            silent = None if previous is None else round(last_inbound_at - previous, 3)
            detail = {"silentForSeconds": silent, "lastInboundAt": last_inbound_at}
            self._tasks.spawn(
                self._incidents.record(phone, "session.deaf_recovered", detail, NotificationEvent.DEAF_RECOVERED)
            )

    def connection(self, phone: PhoneRef, connected: bool, now: float) -> None:
        watched = self._watched.get(phone.organization_phone_id)
        if watched is None and not connected:
            return
        watched = watched or self._watch(phone)
        watched.state = on_connection(watched.state, now, connected)

    def forget(self, organization_phone_id: int) -> None:
        self._watched.pop(organization_phone_id, None)
        self._troubled.pop(organization_phone_id, None)

    def expire(self, now: float, ttl: float) -> int:
        """Bounded memory: forget disconnected sessions with no traffic for `ttl` (--state-ttl); returns how many."""
        quiet = [
            phone_id
            for phone_id, watched in self._watched.items()
            if not watched.state.connected and (watched.state.last_inbound or 0.0) < now - ttl
        ]
        for phone_id in quiet:
            del self._watched[phone_id]
            self._troubled.pop(phone_id, None)
        return len(quiet)

    # Views --------------------------------------------------------------------------------------------

    def last_inbound(self, organization_phone_id: int) -> float | None:
        watched = self._watched.get(organization_phone_id)
        return watched.state.last_inbound if watched is not None else None

    def state_of(self, organization_phone_id: int) -> Liveness | None:
        watched = self._watched.get(organization_phone_id)
        return watched.state if watched is not None else None

    def reports(self, organization_phone_id: int) -> int:
        """Activity reports with traffic so far: a session has a baseline from `min_reports` on."""
        watched = self._watched.get(organization_phone_id)
        return watched.state.reports if watched is not None else 0

    def status(self, organization_phone_id: int) -> Status | None:
        watched = self._watched.get(organization_phone_id)
        return watched.state.status if watched is not None else None

    @property
    def deaf_count(self) -> int:
        return sum(1 for status in self._troubled.values() if status is Status.DEAF)

    @property
    def troubled(self) -> Mapping[int, Status]:
        """The statuses of the sessions found suspect or deaf (by organizationPhoneId), without a scan."""
        return self._troubled

    def _track(self, organization_phone_id: int, status: Status) -> None:
        if status is Status.OK:
            self._troubled.pop(organization_phone_id, None)
        else:
            self._troubled[organization_phone_id] = status

    @property
    def watched_count(self) -> int:
        return len(self._watched)

    @property
    def restarts_tripped(self) -> bool:
        return self._safety.restarts.tripped

    async def probe(self, organization_phone_id: int) -> float:
        """An operator's probe (HTTP): the round trip in milliseconds; raises as LivenessSockets does."""
        if self._sockets is None:
            raise SocketUnreachable("this runtime link cannot probe")
        return await self._sockets.probe_session(organization_phone_id)

    # The tick -----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, interval: float = TICK_SECONDS) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            await self.tick()

    async def tick(self) -> None:
        now = self._now()
        for phone_id, watched in list(self._watched.items()):
            if self._is_closed(phone_id):  # logged out: nothing to watch until a new login reports in
                del self._watched[phone_id]
                self._troubled.pop(phone_id, None)
                continue
            watched.state, action = on_tick(watched.state, now, self.config)
            if action is not Action.NONE:
                self._track(phone_id, watched.state.status)
            if action is Action.PROBE:
                self._tasks.spawn(self._probe(watched))
            elif action is Action.DEAF:
                why = "silent past the confirmation window; its runtime cannot probe" if watched.unprobed else None
                await self._deaf(watched, why or "silent past a successful probe")

    async def _probe(self, watched: Watched) -> None:
        ok, outcome = True, "ok"
        try:
            if self._sockets is None:
                raise SocketUnreachable("this runtime link cannot probe")
            watched.probe_ms = await asyncio.wait_for(
                self._sockets.probe_session(watched.phone.organization_phone_id), self._socket_timeout
            )
        except SocketUnreachable as unreachable:
            # No connection to ask: say nothing yet (the session may simply be gone); the next tick asks again.
            log.info("liveness probe: no runtime connection", extra={"fields": {"error": str(unreachable)}})
            watched.state = watched.state._replace(probing=False)
            return
        except SocketCommandUnsupported as unsupported:
            # An older runtime: no evidence either way, so it is judged like a session whose probe succeeded (deaf
            # if the silence lasts the confirmation window too), never on the refusal itself.
            if not watched.unprobed:
                log.warning(
                    "liveness probe: the runtime does not implement session.probe; judging on silence alone",
                    extra={"fields": {"organizationPhoneId": watched.phone.organization_phone_id,
                                      "error": str(unsupported)}},
                )  # fmt: skip
            watched.unprobed, watched.probe_ms = True, None
        except (TimeoutError, SocketCommandFailed) as failed:
            ok, outcome, watched.probe_ms = False, f"failed: {failed}" if str(failed) else "timeout", None
        else:
            watched.unprobed = False
        watched.state, action = on_probe(watched.state, self._now(), ok)
        self._track(watched.phone.organization_phone_id, watched.state.status)
        if action is Action.DEAF:
            await self._deaf(watched, f"probe {outcome}")

    async def _deaf(self, watched: Watched, why: str) -> None:
        phone, state, now = watched.phone, watched.state, self._now()
        detail: dict[str, Any] = {
            "silentForSeconds": round(silence(state, now), 3),
            "thresholdSeconds": threshold(state, self.config, now),
            "why": why,
            "probeRoundTripMs": watched.probe_ms,
            "action": str(self.action),
        }
        await self._incidents.record(phone, str(IncidentKind.DEAF), detail, NotificationEvent.DEAF)
        if self.action is not DeafAction.RESTART:
            return
        if self._safety.observing(phone.organization_id):
            await self._incidents.record(phone, "session.restart_observed", {"why": why}, None)
            return
        admitted, tripped = self._safety.admit_restart(now, self._registry.session_count)
        if not admitted:
            self.restarts_held += 1
            if tripped:
                trip = {"kind": "restart", "why": "too many deaf-session restarts in the window"}
                await self._incidents.record(None, "restart_breaker.tripped", trip, NotificationEvent.BREAKER_TRIPPED)
            await self._incidents.record(phone, "session.restart_held", {"why": why}, None)
            return
        self.restarts += 1
        sockets = self._sockets
        if sockets is None:
            return
        command = sockets.restart_session(phone.organization_phone_id, "deaf", f"deaf session restarted: {why}")
        outcome = await socket_command(command, "restarted", self._socket_timeout)
        await self._incidents.record(phone, "session.restarted", {"why": why, "socket": outcome}, None)

    def _watch(self, phone: PhoneRef) -> Watched:
        watched = self._watched.get(phone.organization_phone_id)
        if watched is None:
            watched = self._watched[phone.organization_phone_id] = Watched(phone, Liveness())
        return watched
