"""Heal execution: delete the narrowest keys a heal decision names, then tell the runtime to drop its cached
copies. At most one heal runs per session; heals decided meanwhile merge, per scope, into the next one."""

from __future__ import annotations

import asyncio
import time

from opentelemetry.trace import Span

from sidecar.rules.policy import Heal, KeyScope, Phase
from sidecar.rules.records import DeleteKeys, StepOutcome, StepResult
from sidecar.runtime.outcomes import fail_span, socket_answer, socket_command, span_ids
from sidecar.runtime.parts import RuntimeParts
from sidecar.runtime.registry import Session


class HealRunner:
    def __init__(self, parts: RuntimeParts) -> None:
        self._steps = parts.steps
        self._sockets = parts.sockets
        self._observers = parts.observers
        self._tasks = parts.tasks
        self._tracer = parts.tracer
        self._observing = parts.safety.observing  # organization id -> observe mode applies
        self._socket_timeout = parts.socket_timeout
        self._database_timeout = parts.database_timeout
        self._keys = parts.keys
        # Sessions with a heal in flight, and the heals queued behind it (merged per scope).
        self._queued: dict[int, dict[KeyScope, tuple[str, ...]]] = {}

    def start(self, session: Session, heal: Heal) -> None:
        queued = self._queued.get(session.organization_phone_id)
        if queued is None:
            self._queued[session.organization_phone_id] = {}
            self._tasks.spawn(self._heal_until_done(session, heal))
            return
        waiting = queued.get(heal.scope, ())
        queued[heal.scope] = waiting + tuple(prefix for prefix in heal.key_prefixes if prefix not in waiting)
        for observer in self._observers:
            observer.heal_coalesced(session.phone, heal)

    def supersede(self, organization_phone_id: int) -> None:
        """A close deletes every key: the heals queued for this session are dropped."""
        queued = self._queued.get(organization_phone_id)
        if queued is not None:
            queued.clear()

    async def _heal_until_done(self, session: Session, first: Heal) -> None:
        queued = self._queued[session.organization_phone_id]
        try:
            heal: Heal | None = first
            while heal is not None:
                await self._heal(session, heal)
                heal = None
                if session.state.phase is Phase.ACTIVE and queued:
                    scope, prefixes = queued.popitem()
                    heal = Heal(scope, prefixes)
        finally:
            del self._queued[session.organization_phone_id]

    def _clear_once_committed(self, session: Session, heal: Heal, done: asyncio.Future[StepResult]) -> None:
        if done.cancelled() or done.exception() is not None or session.state.phase is not Phase.ACTIVE:
            return
        command = self._sockets.clear_cached_keys(session.organization_phone_id, heal.key_prefixes)
        self._tasks.spawn(socket_command(command, "cleared", self._socket_timeout))

    async def _heal(self, session: Session, heal: Heal) -> None:
        with self._tracer.start_as_current_span("session.heal", attributes=span_ids(session.phone)) as span:
            await self._heal_in_span(session, heal, span)

    async def _heal_in_span(self, session: Session, heal: Heal, span: Span) -> None:
        started = time.monotonic()
        observe = self._observing(session.phone.organization_id)
        if self._keys.in_step:
            keys_deleted, outcome, socket = await self._heal_in_store(session, heal, observe)
        else:
            keys_deleted, outcome, socket = await self._heal_elsewhere(session, heal, observe)
        if span.is_recording():
            span.set_attributes(
                {"whatsapp.heal.scope": str(heal.scope), "whatsapp.auth.keys_deleted": keys_deleted or 0}
            )
            if outcome.startswith(StepOutcome.FAILED):
                fail_span(span, outcome)
        for observer in self._observers:
            observer.healed(session.phone, heal, keys_deleted, str(outcome), socket, time.monotonic() - started)

    async def _heal_elsewhere(self, session: Session, heal: Heal, observe: bool) -> tuple[int | None, str, str]:
        """Keys in a key store of their own (deleted there, then the runtime told), or the runtime's (told to
        delete them; its ack says how many)."""
        phone_id = session.organization_phone_id
        if self._keys.store is not None:
            removal = await self._keys.remove(session.phone, heal.key_prefixes, observe, self._database_timeout,
                                              self._tasks)  # fmt: skip
            if observe:
                return None, removal.outcome, f"{StepOutcome.SKIPPED}: observe mode"
            if removal.outcome.startswith(StepOutcome.FAILED) and not removal.deleted:
                return None, removal.outcome, f"{StepOutcome.SKIPPED}: the deletion failed"
            if removal.outcome.startswith(StepOutcome.PENDING):  # told now, the runtime would reload the old keys
                return None, removal.outcome, f"{StepOutcome.SKIPPED}: the deletion is pending"
            if session.state.phase is not Phase.ACTIVE:
                return removal.deleted, removal.outcome, "skipped: superseded by a close"
            command = self._sockets.clear_cached_keys(phone_id, heal.key_prefixes)
            return removal.deleted, removal.outcome, await socket_command(command, "cleared", self._socket_timeout)
        if observe:
            return None, str(StepOutcome.OK), f"{StepOutcome.SKIPPED}: observe mode"
        if session.state.phase is not Phase.ACTIVE:
            return None, str(StepOutcome.OK), "skipped: superseded by a close"
        command = self._sockets.clear_cached_keys(phone_id, heal.key_prefixes)
        socket, deleted = await socket_answer(command, "cleared", self._socket_timeout)
        outcome = str(StepOutcome.OK) if socket == "cleared" else f"{StepOutcome.FAILED}: the runtime answered {socket}"
        return deleted, outcome, socket

    async def _heal_in_store(self, session: Session, heal: Heal, observe: bool) -> tuple[int | None, str, str]:
        future = await self._steps.submit(DeleteKeys(session.phone, heal.scope, heal.key_prefixes, observe))
        keys_deleted: int | None = None
        outcome = str(StepOutcome.OK)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self._database_timeout)
            keys_deleted = result if isinstance(result, int) else None
        except TimeoutError:
            outcome = StepOutcome.PENDING
        except Exception as error:
            outcome = f"{StepOutcome.FAILED}: {type(error).__name__}: {error}"
        if observe:
            socket = f"{StepOutcome.SKIPPED}: observe mode"
            keys_deleted = None  # only counted: nothing was deleted
        elif outcome is StepOutcome.PENDING:
            # Told now, the runtime would reload the old keys from the database: it is told once they are gone.
            future.add_done_callback(lambda done: self._clear_once_committed(session, heal, done))
            socket = "deferred: sent once the deletion commits"
        elif outcome != StepOutcome.OK:
            socket = f"{StepOutcome.SKIPPED}: the deletion failed, the cached keys still match the database"
        elif session.state.phase is Phase.ACTIVE:
            command = self._sockets.clear_cached_keys(session.organization_phone_id, heal.key_prefixes)
            socket = await socket_command(command, "cleared", self._socket_timeout)
        else:
            socket = "skipped: superseded by a close"  # the close deletes every key and ends the socket anyway
        return keys_deleted, str(outcome), socket
