"""The close sequence: end the socket, then the database half (keys, status, record, counters), then forget.

Every step is attempted whatever happened to the ones before; the session is forgotten in any case. One close
per session at a time: `start` is only called for a session whose phase just became CLOSING.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

from sidecar.ports import StoreUnavailable
from sidecar.rules.policy import Close, CloseCompleted, Phase, SessionState, decide, error_stats
from sidecar.rules.records import CloseTrigger, ClosureRecord, Logout, LogoutResult, NotificationEvent, StepOutcome
from sidecar.runtime.outcomes import fail_span, socket_answer, span_ids
from sidecar.runtime.parts import RuntimeParts
from sidecar.runtime.registry import LoggedOut, Session

DATABASE_PARTS = ("authKeys", "phoneStatus", "closureRecord", "counters")
DATABASE_SPANS = {
    "authKeys": "auth.delete_keys",
    "phoneStatus": "phone.mark_logged_out",
    "closureRecord": "closure.record",
}


def database_failed(record: ClosureRecord) -> bool:
    """A part of the close's database half failed by itself (an outage leaves it pending instead)."""
    return any(record.steps.get(part, "").startswith(StepOutcome.FAILED) for part in DATABASE_PARTS)


class CloseSequence:
    def __init__(self, parts: RuntimeParts, release_claim: Callable[[int, int], Awaitable[None]] | None) -> None:
        """`release_claim` (fleet mode): give a claimed close back (phone id, generation) when an operator's
        close is undone."""
        self._policy = parts.policy
        self._registry = parts.registry
        self._steps = parts.steps
        self._sockets = parts.sockets
        self._observers = parts.observers
        self._notices = parts.notices
        self._tasks = parts.tasks
        self._tracer = parts.tracer
        self._clock = parts.clock
        self._observing = parts.safety.observing
        self._loops = parts.safety.loops
        self._socket_timeout = parts.socket_timeout
        self._database_timeout = parts.database_timeout
        self._keys = parts.keys
        self._in_flight: dict[int, asyncio.Task[ClosureRecord]] = {}
        self.release_claim = release_claim

    def start(
        self, session: Session, decision: Close, trigger: CloseTrigger, generation: int | None = None
    ) -> asyncio.Task[ClosureRecord]:
        """`generation`: in fleet mode, the close claim's fencing number (the database half checks it)."""
        phone_id = session.organization_phone_id
        task = self._tasks.spawn(self._close(session, decision, trigger, generation))
        self._in_flight[phone_id] = task
        task.add_done_callback(lambda done: self._done(phone_id, done))
        return task

    def _done(self, phone_id: int, task: asyncio.Task[ClosureRecord]) -> None:
        if self._in_flight.get(phone_id) is task:
            del self._in_flight[phone_id]

    def in_flight_phones(self) -> list[int]:
        return list(self._in_flight)

    def in_flight(self, organization_phone_id: int) -> asyncio.Task[ClosureRecord] | None:
        return self._in_flight.get(organization_phone_id)

    async def _close(
        self, session: Session, decision: Close, trigger: CloseTrigger, generation: int | None
    ) -> ClosureRecord:
        started = time.monotonic()
        observe = self._observing(session.phone.organization_id)
        record = ClosureRecord(
            closure_id=uuid.uuid4().hex,
            phone=session.phone,
            reason=decision.reason,
            trigger=trigger,
            detail=decision.detail,
            counters=decision.counters,
            started_at=self._clock(),
        )
        with self._tracer.start_as_current_span("session.close", attributes=span_ids(session.phone)) as span:
            try:
                for observer in self._observers:
                    observer.closing(record)
                said_deleted: int | None = None
                with self._tracer.start_as_current_span("runtime.end_socket") as socket_span:
                    if observe:
                        record.socket = f"{StepOutcome.SKIPPED}: observe mode"
                    else:
                        command = self._sockets.end_session(
                            session.organization_phone_id, str(decision.reason), decision.detail
                        )
                        record.socket, said_deleted = await socket_answer(command, "ended", self._socket_timeout)
                        if record.socket != "ended":
                            fail_span(socket_span, record.socket)
                record.steps["socket"] = record.socket
                if not self._keys.in_step:
                    await self._remove_keys(record, observe, said_deleted)
                database_steps, record.keys_deleted, timings = await self._logout(record, observe, generation)
                record.steps.update(database_steps)
                self._trace_database_parts(record.steps, timings)
            finally:
                record.duration_seconds = time.monotonic() - started
                if trigger is CloseTrigger.OPERATOR and database_failed(record):
                    await self._undo(session, decision, generation)  # not done: the operator may retry
                else:
                    self._forget(session, LoggedOut(self._clock().timestamp(), observe))
                if span.is_recording():
                    span.set_attributes(
                        {
                            "whatsapp.close.reason": str(record.reason),
                            "whatsapp.close.trigger": str(record.trigger),
                            "whatsapp.auth.keys_deleted": record.keys_deleted or 0,
                        }
                    )
                for observer in self._observers:
                    observer.closed(record)
        return record

    async def _remove_keys(self, record: ClosureRecord, observe: bool, said_deleted: int | None) -> None:
        """Keys outside the session store: deleted in their key store now (the database half records it), or by
        the runtime as it ended the socket (its ack said how many)."""
        with self._tracer.start_as_current_span("auth.delete_keys") as span:
            if self._keys.store is not None:
                removal = await self._keys.remove(record.phone, None, observe, self._database_timeout, self._tasks)
                record.steps["authKeys"], record.keys_deleted = removal.outcome, removal.deleted
            elif observe:
                record.steps["authKeys"] = f"{StepOutcome.SKIPPED}: observe mode"
            elif record.socket == "ended":
                record.steps["authKeys"] = StepOutcome.OK if said_deleted is not None else (
                    f"{StepOutcome.SKIPPED}: the runtime's ack did not say how many it deleted"
                )  # fmt: skip
                record.keys_deleted = said_deleted
            else:
                record.steps["authKeys"] = f"{StepOutcome.PENDING}: the runtime deletes them when it ends the socket"
            if record.steps["authKeys"].startswith((StepOutcome.FAILED, StepOutcome.PENDING)):
                fail_span(span, record.steps["authKeys"])

    def _trace_database_parts(self, steps: dict[str, str], timings: dict[str, tuple[int, int]]) -> None:
        for part, span_name in DATABASE_SPANS.items():
            if part == "authKeys" and not self._keys.in_step:
                continue  # traced where it happened (_remove_keys)
            started, ended = timings.get(part, (None, None))
            span = self._tracer.start_span(span_name, start_time=started)
            if steps.get(part, "").startswith((StepOutcome.FAILED, StepOutcome.PENDING)):
                fail_span(span, steps[part])
            span.end(end_time=ended)

    async def _logout(
        self, record: ClosureRecord, observe: bool, generation: int | None
    ) -> tuple[dict[str, str], int | None, dict[str, tuple[int, int]]]:
        """The database half of a close; waits a bounded time, then reports it as pending."""
        try:
            stats = dict(error_stats(record.counters, self._policy.limits))
            closed = self._notices.notification(NotificationEvent.CLOSED, stats, str(record.reason))
            given = not self._keys.in_step
            logout = Logout(replace(record, steps=dict(record.steps)), closed, observe, generation, keys_given=given)
            future = await self._steps.submit(logout)
            result = await asyncio.wait_for(asyncio.shield(future), self._database_timeout)
        except TimeoutError:
            return dict.fromkeys(DATABASE_PARTS, StepOutcome.PENDING), None, {}
        except Exception as error:
            return dict.fromkeys(DATABASE_PARTS, f"{StepOutcome.FAILED}: {type(error).__name__}: {error}"), None, {}
        assert isinstance(result, LogoutResult)
        steps = {name: value for name, value in result.steps.items() if name != "socket"}
        timings = dict(result.timings)
        if not self._keys.in_step:
            timings.pop("authKeys", None)  # traced where it happened (_remove_keys)
        return steps, result.keys_deleted, timings

    async def _undo(self, session: Session, decision: Close, generation: int | None) -> None:
        """An operator's close whose database half failed for a reason of its own (not an outage) is not done:
        the session stays open with its counts, and in fleet mode the claim is released, so a retry closes it."""
        session.state = SessionState(decision.counters, Phase.ACTIVE)
        if generation is not None and self.release_claim is not None:
            with contextlib.suppress(StoreUnavailable):  # the claim's lease expires by itself otherwise
                await self.release_claim(session.organization_phone_id, generation)

    def _forget(self, session: Session, logged_out: LoggedOut) -> None:
        session.state = decide(session.state, CloseCompleted(), self._policy).state
        self._registry.close_out(session, logged_out)
        self._loops.forget(session.organization_phone_id)
        for observer in self._observers:
            observer.forgotten(session.phone)
