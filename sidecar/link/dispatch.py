"""Applies validated session events to the runtime (shared by the WebSocket link, HTTP ingest and log ingest)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from sidecar.link.protocol import Activity, ConnectionUpdate, DecryptError, SessionEvent
from sidecar.runtime import SessionRuntime
from sidecar.telemetry.tracing import context_from_traceparent

YIELD_EVERY = 100  # events between yields to the loop: a big frame must not starve the API and other connections


async def apply_events(runtime: SessionRuntime, events: Iterable[SessionEvent]) -> int:
    """Apply one batch in arrival order; returns how many events it held. Errors that change no decision are
    tallied and applied once per phone and class (runtime/tally.py), each phone's tally before anything else of
    that phone, so every session sees its events in the order they came."""
    tally = runtime.error_tally()  # None with a tracing exporter: every error then gets its own span
    count = 0
    for event in events:
        count += 1
        if count % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        if tally is not None:
            if type(event) is DecryptError and tally.add(event):
                continue
            tally.flush(event.organization_phone_id)
        await apply_event(runtime, event)
    if tally is not None:
        tally.flush_all()
    return count


async def apply_event(runtime: SessionRuntime, event: SessionEvent) -> None:
    if isinstance(event, ConnectionUpdate):
        await runtime.on_connection_update(
            event.organization_id,
            event.organization_phone_id,
            event.phone_jid,
            event.connection,
            event.status_code,
            event.new_login,
        )
    elif isinstance(event, Activity):
        await runtime.handle_activity(
            event.organization_id, event.organization_phone_id, event.phone_jid, event.last_inbound_at
        )
    else:
        await runtime.handle_decrypt_error(
            event.organization_id,
            event.organization_phone_id,
            event.phone_jid,
            event.error,
            event.source,
            event.peer_jid,
            context_from_traceparent(event.traceparent),
            event.collection,
        )
