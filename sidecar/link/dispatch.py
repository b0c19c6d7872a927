"""Applies validated session events to the runtime (shared by the WebSocket link and HTTP ingest)."""

from __future__ import annotations

from sidecar.link.protocol import Activity, ConnectionUpdate, SessionEvent
from sidecar.runtime import SessionRuntime
from sidecar.telemetry.tracing import context_from_traceparent


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
