"""The parts create_app builds, reachable from handlers and tests through `app[COMPONENTS]`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from sidecar.config import Config
from sidecar.events.intake import Intake
from sidecar.link.connections import LinkConnections
from sidecar.link.server import LinkServer
from sidecar.notify.delivery import Delivery
from sidecar.notify.owners import OwnersWatcher
from sidecar.ports import SessionStore
from sidecar.runtime import SessionRuntime
from sidecar.store.pending import PendingSteps
from sidecar.store.schema_check import SchemaWatch
from sidecar.supervisor import Supervisor
from sidecar.telemetry.metrics import SidecarMetrics
from sidecar.telemetry.session_families import SessionFamilies
from sidecar.telemetry.tracing import Tracing

if TYPE_CHECKING:  # the http package's routes import this module: a type only, no import cycle
    from sidecar.http.idempotency import IdempotencyKeys


@dataclass
class Components:
    config: Config
    store: SessionStore
    pending: PendingSteps
    runtime: SessionRuntime
    link: LinkConnections
    intake: Intake
    link_server: LinkServer
    metrics: SidecarMetrics
    families: SessionFamilies
    tracing: Tracing
    owners: OwnersWatcher
    delivery: Delivery | None
    supervisor: Supervisor
    schema: SchemaWatch | None
    idempotency: IdempotencyKeys
    restored: asyncio.Event = field(default_factory=asyncio.Event)


COMPONENTS = web.AppKey("components", Components)
