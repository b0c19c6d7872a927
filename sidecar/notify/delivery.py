"""Signed webhook delivery of owner notifications from the outbox, with retries and dead letters.

Each request is signed per Standard Webhooks (https://www.standardwebhooks.com): `webhook-id` (the
notification id, the same on every retry), `webhook-timestamp` (unix seconds) and `webhook-signature:
v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<raw body>">` under the team's secret, so a receiver verifies it
with a stock library and rejects forgeries and replays. Delivery is at least once; `webhook-id` (also the
body's `id`) lets receivers drop repeats. 2xx: delivered. 4xx other than 408/429: dead at once (retrying
cannot help). Anything else (5xx, 408, 429, timeouts, refused connections): retried with exponential backoff
and jitter, dead after `max_attempts`. Dead letters stay in the outbox (`GET /v1/notifications?status=dead`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from sidecar import __version__
from sidecar.notify.owners import Owners, Team
from sidecar.ports import Outbox, OutboxRow, StoreUnavailable
from sidecar.supervisor import Supervisor
from sidecar.telemetry.metrics import SidecarMetrics

log = logging.getLogger("sidecar.notify")

LEASE_SECONDS = 60.0
IDLE_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class DeliveryPolicy:
    max_attempts: int = 8
    attempt_timeout: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    concurrency: int = 16

    def backoff(self, attempts: int) -> float:
        """Exponential with full jitter between half and all of the step."""
        step: float = min(self.backoff_max, self.backoff_initial * 2.0 ** max(0, attempts - 1))
        return step * random.uniform(0.5, 1.0)


def sign(secret: bytes, message_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks v1: base64 of HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<raw body>"."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


def payload(row: OutboxRow, team: str, instance: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": row.event,
        "id": row.notification_id,
        "occurredAt": row.occurred_at.isoformat(),
        "organizationId": row.organization_id,
        "organizationPhoneId": row.organization_phone_id,
        "team": team,
        "stats": row.stats,
        "reason": row.reason,
        "instance": instance,
        "traceId": row.trace_id,
    }
    if row.details:
        body["restriction" if row.event.startswith("session.restrict") else "close"] = row.details
    return body


class Delivery:
    def __init__(
        self,
        outbox: Outbox,
        owners: Callable[[], Owners],
        metrics: SidecarMetrics,
        tracer: trace.Tracer,
        instance: str,
        policy: DeliveryPolicy | None = None,
    ) -> None:
        self._outbox = outbox
        self._owners = owners
        self._metrics = metrics
        self._tracer = tracer
        self._instance = instance
        self.policy = policy or DeliveryPolicy()
        self._wake = asyncio.Event()
        self._gone: dict[str, str] = {}  # team -> the URL that answered 410 Gone (disabled until the file changes)
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.depth = 0

    def wake(self) -> None:
        self._wake.set()

    def owners_changed(self) -> None:
        """A changed owners file re-enables endpoints that answered 410 Gone."""
        for team in self._gone:
            self._metrics.webhook_disabled.labels(team).set(0)
        self._gone.clear()
        self._wake.set()

    async def start(self, supervisor: Supervisor | None = None) -> None:
        """Deliver in the background; under `supervisor`, an unexpected error is logged, counted and restarts
        the loop (the outbox keeps every notification)."""
        self._http = aiohttp.ClientSession(headers={"User-Agent": f"whatsapp-session-sidecar/{__version__}"})
        if supervisor is not None:
            self._task = supervisor.start("owner-notifications", self._run)
        else:
            self._task = asyncio.create_task(self._run(), name="owner-notifications")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    async def _run(self) -> None:
        limit = asyncio.Semaphore(self.policy.concurrency)
        while True:
            self._wake.clear()
            try:
                rows = await self._outbox.claim_due(self.policy.concurrency * 4, LEASE_SECONDS)
                if rows:

                    async def bounded(row: OutboxRow) -> None:
                        async with limit:
                            await self._deliver(row)

                    await asyncio.gather(*(bounded(row) for row in rows))
                self.depth = await self._outbox.outbox_depth()
            except (StoreUnavailable, OSError, TimeoutError) as error:
                log.warning("outbox unreachable: %s", error)
                rows = []
            if rows:
                continue  # more may be due right away
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)

    async def _deliver(self, row: OutboxRow) -> None:
        owners = self._owners()
        team_name = owners.team_name(row.organization_id, row.organization_phone_id)
        team = owners.teams.get(team_name)
        attempts = row.attempts + 1
        if team is None:
            await self._outbox.finish(
                row.notification_id, "skipped", row.attempts, "no webhook for this team", team_name
            )
            self._count(team_name, row.event, "skipped")
            return
        if self._gone.get(team_name) == team.webhook_url:
            error = "endpoint disabled: it answered 410 Gone; deliveries resume when the owners file changes"
            await self._outbox.finish(row.notification_id, "dead", row.attempts, error, team_name)
            self._count(team_name, row.event, "dead")
            return
        with self._tracer.start_as_current_span(
            "owner.notify",
            attributes={
                "whatsapp.notification.event": row.event,
                "whatsapp.team": team_name,
                "whatsapp.organization_phone_id": row.organization_phone_id,
                "whatsapp.notification.attempt": attempts,
            },
        ) as span:
            status, error = await self._post(team, row, team_name)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if status is not None and 200 <= status < 300:
                await self._outbox.finish(row.notification_id, "delivered", attempts, None, team_name)
                self._count(team_name, row.event, "delivered")
                latency = (datetime.now(UTC) - row.occurred_at).total_seconds()
                self._metrics.notification_latency.observe(max(0.0, latency))
                return
            span.set_status(Status(StatusCode.ERROR, error))
            span.set_attribute("error.type", str(status) if status is not None else error.split(":")[0])
        if status == 410:  # Standard Webhooks: the receiver asks not to be called again
            self._gone[team_name] = team.webhook_url
            self._metrics.webhook_disabled.labels(team_name).set(1)
            log.warning(
                "owner webhook answered 410 Gone: disabled until the owners file changes",
                extra={"fields": {"team": team_name}},
            )
        permanent = status is not None and 400 <= status < 500 and status not in (408, 429)
        if permanent or attempts >= self.policy.max_attempts:
            await self._outbox.finish(row.notification_id, "dead", attempts, error, team_name)
            self._count(team_name, row.event, "dead")
            log.error(
                "owner notification dead-lettered",
                extra={"fields": {"id": row.notification_id, "team": team_name, "attempts": attempts, "error": error}},
            )
            return
        await self._outbox.finish(
            row.notification_id, "pending", attempts, error, team_name, retry_in=self.policy.backoff(attempts)
        )
        self._count(team_name, row.event, "retried")

    async def _post(self, team: Team, row: OutboxRow, team_name: str) -> tuple[int | None, str]:
        assert self._http is not None
        body = json.dumps(payload(row, team_name, self._instance), separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            # Standard Webhooks: the id is stable across retries (the receiver's idempotency key).
            "webhook-id": row.notification_id,
            "webhook-timestamp": timestamp,
            # While a secret rotates (previousSecret… set), one signature per secret: receivers verify with either.
            "webhook-signature": " ".join(sign(key, row.notification_id, timestamp, body) for key in team.secrets),
        }
        try:
            timeout = aiohttp.ClientTimeout(total=self.policy.attempt_timeout)
            async with self._http.post(team.webhook_url, data=body, headers=headers, timeout=timeout) as response:
                await response.read()
                return response.status, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return None, f"{type(error).__name__}: {error}"

    def _count(self, team: str, event: str, outcome: str) -> None:
        self._metrics.owner_notifications.labels(team, event, outcome).inc()
