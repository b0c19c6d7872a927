"""What the runtime tells people: owner notifications (written to the outbox with the change that caused them)
and safety decision records (closure log, observers, owners)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from opentelemetry import trace

from sidecar.ports import StepQueue
from sidecar.rules.records import Notification, NotificationEvent, PhoneRef, RecordDecision
from sidecar.runtime.observer import RuntimeObserver


class Notices:
    def __init__(
        self,
        enabled: bool,
        clock: Callable[[], datetime],
        observers: Sequence[RuntimeObserver],
        steps: StepQueue,
    ) -> None:
        self._enabled = enabled  # owners are configured; without them the outbox stays empty
        self._clock = clock
        self._observers = observers
        self._steps = steps

    def notification(self, event: NotificationEvent, stats: dict[str, Any], reason: str | None) -> Notification | None:
        if not self._enabled:
            return None
        context = trace.get_current_span().get_span_context()
        trace_id = format(context.trace_id, "032x") if context.is_valid else None
        return Notification(uuid.uuid4().hex, event, self._clock(), stats, reason, trace_id)

    async def record(
        self,
        phone: PhoneRef | None,
        decision: str,
        detail: dict[str, Any],
        event: NotificationEvent | None,
        stats: dict[str, Any],
    ) -> None:
        """A safety decision: to the closure log (database and file), the observers, and the owners."""
        notification = self.notification(event, stats, decision) if event is not None else None
        step = RecordDecision(uuid.uuid4().hex, decision, self._clock(), phone, detail, notification)
        for observer in self._observers:
            observer.decided(step)
        await self._steps.submit(step)
