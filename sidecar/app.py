"""create_app(config): wires the parts together and owns the lifecycle of every resource."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import http
from sidecar.components import COMPONENTS, Components
from sidecar.config import Config
from sidecar.coordination import coordination_for
from sidecar.events.intake import STEPS_PER_EVENT, Admission, Intake
from sidecar.http.idempotency import MemoryIdempotencyKeys
from sidecar.http.requests import BODY_TIMEOUT
from sidecar.keystores.spec import KeyPlace, open_key_store
from sidecar.link.connections import LinkConnections
from sidecar.link.sequences import LinkSequences
from sidecar.link.server import LinkServer
from sidecar.notify.delivery import Delivery, DeliveryPolicy
from sidecar.notify.owners import OwnersError, OwnersWatcher
from sidecar.ports import KeyStore, SessionStore, SocketController, StoreUnavailable
from sidecar.retrying import RetryLog
from sidecar.rules.loss import LossTracker
from sidecar.rules.records import Step, step_kind
from sidecar.rules.safety import Breaker
from sidecar.runtime import KeyRemoval, Safety, Watch, assemble
from sidecar.runtime.observer import RuntimeObserver
from sidecar.store.idempotency_keys import PostgresIdempotencyKeys
from sidecar.store.journal import Journal, JournalError
from sidecar.store.loss_ledger import PostgresLossLedger
from sidecar.store.memory import MemoryStore
from sidecar.store.pending import PendingSteps
from sidecar.store.postgres import PostgresStore
from sidecar.store.schema_check import SchemaWatch, version_problem
from sidecar.supervisor import Supervisor
from sidecar.telemetry.action_log import ActionLog, ClosureLogFile
from sidecar.telemetry.metrics import MetricsObserver, SidecarMetrics
from sidecar.telemetry.session_families import SessionFamilies
from sidecar.telemetry.tracing import Tracing, TracingUnavailable, tracing_from_env

log = logging.getLogger("sidecar.app")

RESTORE_RETRY_SECONDS = 1.0
# What asyncpg's named prepared statements meet behind a pooler in transaction mode.
POOLER_SYMPTOMS = (asyncpg.exceptions.DuplicatePreparedStatementError, asyncpg.exceptions.InvalidSQLStatementNameError)


def utc_now() -> datetime:
    return datetime.now(UTC)


class StartupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Extras:
    """What tests and embedders may inject; defaults are built from the config and OTEL_* variables."""

    observers: Sequence[RuntimeObserver] = ()
    clock: Callable[[], datetime] = utc_now
    registry: CollectorRegistry | None = None
    tracing: Tracing | None = None
    sockets: SocketController | None = None  # instead of the runtime link's (ingest-logs: LogOnlySockets)


def create_app(config: Config, extras: Extras | None = None) -> web.Application:
    """The one factory: builds every part and owns its lifecycle (cleanup_ctx), for `serve` and the tests."""
    app = web.Application(client_max_size=http.MAX_BODY_BYTES)
    app[BODY_TIMEOUT] = config.request_body_timeout
    app.cleanup_ctx.append(_components(config, extras or Extras()))

    async def close_runtime_connections(app: web.Application) -> None:
        components = app[COMPONENTS]
        await components.link_server.drain(config.socket_end_timeout + config.database_step_timeout)
        await components.link.close_all()

    app.on_shutdown.append(close_runtime_connections)
    http.add_routes(app)
    return app


def _components(config: Config, extras: Extras) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        clock = extras.clock
        try:
            tracing = extras.tracing or tracing_from_env(os.environ)
        except TracingUnavailable as error:
            raise StartupError(str(error)) from None
        delivery: Delivery | None = None
        owners = _owners(config, lambda _: teams_changed())
        team_of = _team_of(config, owners)
        metrics = SidecarMetrics(
            extras.registry or CollectorRegistry(),
            config.policy.limits,
            lambda organization_id: team_of(organization_id, 0),
        )
        families = SessionFamilies(
            config.policy.limits,
            team_of,
            lambda: clock().timestamp(),
            config.session_metrics,
            config.session_metrics_window,
        )

        def teams_changed() -> None:
            families.reset_labels()
            metrics.teams_changed()
            if delivery is not None:
                delivery.owners_changed()

        supervisor = Supervisor(lambda task: metrics.task_failures.labels(task).inc())
        store = await open_store(config, clock)
        if config.owners_file is not None:
            policy = DeliveryPolicy(config.webhook_max_attempts, config.webhook_timeout, config.webhook_backoff_initial)
            delivery = Delivery(store, lambda: owners.current, metrics, tracing.tracer, config.instance, policy)
        journal: Journal[Step] | None = Journal(config.state_dir) if config.state_dir and config.database_url else None
        pending = PendingSteps(
            store,
            config.pending_steps_limit,
            journal,
            on_wait=metrics.step_wait.observe,
            on_failed=lambda step, reason: metrics.steps_failed.labels(step_kind(step), reason).inc(),
            supervisor=supervisor,
            on_applied=delivery.wake if delivery is not None else None,
        )
        observers: list[RuntimeObserver] = [ActionLog(), MetricsObserver(metrics), families]
        closure_log = ClosureLogFile(config.closure_log_path) if config.closure_log_path is not None else None
        if closure_log is not None:
            observers.append(closure_log)
        observers.extend(extras.observers)
        coordination = coordination_for(config, store)
        clock = coordination.clock(clock)
        link = LinkConnections(
            coordination.leases,
            coordination.owed_ends,
            config.socket_end_timeout,
            metrics.owed_ends_delivered.inc,
        )
        link_sockets = coordination.sockets(link)
        sockets = extras.sockets or link_sockets
        key_store = open_key_store(config.key_store, config.database_step_timeout)
        if key_store is not None:
            await _announce_key_store(key_store)
        runtime = assemble(
            config.policy,
            store,
            pending,
            sockets,
            observers,
            clock=clock,
            socket_end_timeout=config.socket_end_timeout,
            database_step_timeout=config.database_step_timeout,
            tracer=tracing.tracer,
            notifications=config.owners_file is not None,
            safety=Safety(
                breaker=Breaker(config.breaker),
                restarts=Breaker(config.breaker),
                mode=config.mode,
                observe_organizations=config.observe_organizations,
                logout_stick_seconds=config.logout_stick_seconds,
            ),
            fleet=coordination.fleet(
                lambda reason: metrics.steps_failed.labels("decide_event", reason).inc(),
                delivery.wake if delivery is not None else None,  # flips are written with the decisions
            ),
            state_ttl=config.state_ttl,
            losses=LossTracker(config.loss_deadline),
            loss_ledger=PostgresLossLedger(store) if isinstance(store, PostgresStore) else None,
            keys=KeyRemoval(key_store, by_runtime=config.key_store.place is KeyPlace.RUNTIME),
            watch=Watch(config.liveness, config.deaf_action, link_sockets),
            on_failure=lambda what, name: (
                (metrics.observer_failures if what == "observer" else metrics.task_failures).labels(name).inc()
            ),
        )
        decider = runtime.decider
        admission = Admission(pending.caught_up, lambda: pending.room - STEPS_PER_EVENT * decider.backlog)
        intake = Intake(runtime, link.acknowledge, admission, metrics)
        link_server = LinkServer(link, intake, runtime, LinkSequences(coordination.sequences))
        if delivery is not None:
            metrics.outbox_depth.set_function(lambda: delivery.depth if delivery else 0)
        metrics.bind(
            lambda: link.connection_count,
            lambda: pending.depth,
            lambda: runtime.session_count,
            lambda: runtime.closed_count,
            lambda: pending.oldest_age,
            lambda: decider.backlog,
            lambda: decider.oldest_undecided_age,
        )
        metrics.bind_liveness(
            lambda: runtime.liveness.deaf_count,
            lambda: runtime.liveness.watched_count,
            lambda: runtime.liveness.restarts_tripped,
        )
        metrics.bind_safety(
            lambda: runtime.breaker_tripped,
            lambda: runtime.held_count,
            lambda: runtime.mode[0],
            lambda: len(runtime.mode[1]),
        )
        schema = (
            SchemaWatch(store.schema_version, store.latest_schema_version, config.schema.sidecar_schema)
            if isinstance(store, PostgresStore)
            else None
        )
        idempotency = PostgresIdempotencyKeys(store) if isinstance(store, PostgresStore) else MemoryIdempotencyKeys()
        components = Components(
            config, store, pending, runtime, link, intake, link_server, metrics, families, tracing, owners, delivery,
            supervisor, schema, idempotency,
        )  # fmt: skip
        app[COMPONENTS] = components
        metrics.bind_fleet(
            lambda: decider.parked_phones, lambda: coordination.clock_ahead, lambda: runtime.messages_unsettled
        )
        metrics.runtime_versions.bind(lambda: link.sessions_by_runtime(lambda phone: not runtime.is_closed(phone)))
        try:
            await coordination.start()
            replayed = await pending.start()
            undecided = await decider.start()
        except JournalError as error:
            await store.close()
            raise StartupError(str(error)) from None
        if replayed:
            log.warning("replaying %d database steps journaled before the last stop", replayed)
        if undecided:
            log.warning("deciding %d events accepted and not decided before the last stop", undecided)
        if delivery is not None:
            await delivery.start(supervisor)
        supervisor.start("restore", lambda: _restore(components))
        supervisor.start("owners-watch", lambda: _watch_owners(owners))
        supervisor.start("housekeeping", lambda: _housekeeping(components))
        supervisor.start("restrictions", lambda: _end_restrictions(components))
        supervisor.start("message-loss", lambda: _count_losses(components))
        stop_liveness = asyncio.Event()
        supervisor.start("liveness", lambda: runtime.liveness.run(stop_liveness, config.liveness_tick))
        if schema is not None:
            supervisor.start("schema-check", schema.run)
        stop_fleet = asyncio.Event()
        for name, task in (decider.background() | coordination.background(stop_fleet)).items():
            supervisor.start(name, task)
        try:
            yield
        finally:
            stop_fleet.set()
            stop_liveness.set()
            await supervisor.stop(keep={"pending-steps", "owner-notifications"})  # stopped in order below
            # A close needs at most the socket wait plus the database wait; past that, what is left is cancelled.
            await decider.stop()
            await runtime.shutdown(config.socket_end_timeout + config.database_step_timeout + 1)
            try:
                await runtime.hand_over_losses()
            except StoreUnavailable as error:
                log.warning("could not hand the pending failed messages to the fleet: %s", error)
            await pending.stop()
            coordination.close()
            if delivery is not None:
                await delivery.stop()
            await store.close()
            if key_store is not None:
                await key_store.close()
            if closure_log is not None:
                await asyncio.to_thread(closure_log.close)
            tracing.shutdown()

    return lifecycle


async def _announce_key_store(key_store: KeyStore) -> None:
    """Say where the keys are; a store away at start is not fatal (deletions wait for it), but it is said."""
    try:
        await asyncio.wait_for(key_store.ping(), 2.0)
    except (StoreUnavailable, TimeoutError) as error:
        log.warning("key store %s unreachable at start (%s): heals and closes wait for it", key_store.description,
                    error or "no answer within 2 s")  # fmt: skip
        return
    log.info("auth keys in %s", key_store.description)


OWNERS_POLL_SECONDS = 2.0


def _owners(config: Config, on_change: Callable[[Any], None]) -> OwnersWatcher:
    try:
        return OwnersWatcher(config.owners_file, on_change)
    except OwnersError as error:
        raise StartupError(f"owners file {config.owners_file}: {error}") from None


def _team_of(config: Config, owners: OwnersWatcher) -> Callable[[int, int], str]:
    if config.owners_file is None:
        return lambda organization_id, _: config.team_of(organization_id)
    return lambda organization_id, phone_id: owners.current.team_name(organization_id, phone_id)


async def _watch_owners(owners: OwnersWatcher) -> None:
    """Picks up a changed owners file (a ConfigMap update) without a restart; SIGHUP reloads at once."""
    while owners.path is not None:
        await asyncio.sleep(OWNERS_POLL_SECONDS)
        owners.poll()


async def open_store(config: Config, clock: Callable[[], datetime]) -> SessionStore:
    if config.database_url is None:
        log.warning("no database URL: using the embedded in-memory store; counters and closures are not durable")
        return MemoryStore(clock, config.schema.logged_out_status)
    store = await PostgresStore.connect(
        config.database_url,
        config.schema,
        command_timeout=config.database_command_timeout,
        pooler=config.database_pooler,
    )
    try:
        version = await store.schema_version()
    except POOLER_SYMPTOMS as error:
        await store.close()
        raise StartupError(
            f"PostgreSQL answered {type(error).__name__} ({str(error).splitlines()[0]}): a pooler in transaction "
            "mode (PgBouncer) sits in front of it; start with --database-pooler transaction "
            "(WA_SIDECAR_DATABASE_POOLER)"
        ) from None
    except StoreUnavailable as error:
        if "unsupported startup parameter" in str(error):  # PgBouncer refusing the session timeouts
            await store.close()
            raise StartupError(
                f"the database answered {str(error).splitlines()[0]!r}: a pooler (PgBouncer) sits in front of "
                "PostgreSQL; start with --database-pooler transaction or session (WA_SIDECAR_DATABASE_POOLER)"
            ) from None
        log.warning("PostgreSQL is not reachable yet (%s); starting not ready", error)
        return store
    if (problem := version_problem(version, store.latest_schema_version, config.schema.sidecar_schema)) is not None:
        await store.close()
        raise StartupError(problem)
    return store


HOUSEKEEPING_SECONDS = 60.0
RETENTION_BATCH = 1000


async def _housekeeping(components: Components) -> None:
    """Bounded state, off the hot path: every minute the runtime forgets what holds nothing past --state-ttl;
    every --retention/100 (at most hourly) the store deletes history past --retention, in small batches."""
    config, metrics = components.config, components.metrics
    loop = asyncio.get_running_loop()
    prune_every = min(3600.0, config.retention / 100)
    next_prune = loop.time()
    while True:
        interval = min(HOUSEKEEPING_SECONDS, config.state_ttl / 4)
        if expired := components.runtime.expire_state():
            metrics.sessions_expired.inc(len(expired))
            components.link.forget([phone.organization_phone_id for phone in expired])
        if loop.time() >= next_prune:
            try:
                deleted = await components.store.prune(config.retention, RETENTION_BATCH)
            except StoreUnavailable:
                deleted = {}  # retried at the next round; the outage is reported by the steps waiting for it
            for table, count in deleted.items():
                metrics.retention_deleted.labels(table).inc(count)
            if any(deleted.values()):
                log.info("retention deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items() if n))
            next_prune = loop.time() + prune_every
        await asyncio.sleep(interval)


RESTRICTION_TICK_SECONDS = 1.0


async def _end_restrictions(components: Components) -> None:
    """A time lock with `until` ends by itself: lifted on the timeline (and told to its team) once it passes."""
    await components.restored.wait()  # what the timeline holds in force is loaded first
    while True:
        await components.runtime.expire_restrictions()
        await asyncio.sleep(RESTRICTION_TICK_SECONDS)


LOSS_TICK_SECONDS = 1.0


async def _count_losses(components: Components) -> None:
    """A failed message whose --loss-deadline passed unrecovered is lost: counted, and a session's first told."""
    while True:
        await components.runtime.expire_losses()
        await asyncio.sleep(LOSS_TICK_SECONDS)


async def _restore(components: Components) -> None:
    """Load stored counters; while the store is away, keep trying (events are counted meanwhile)."""
    retries = RetryLog(log, "load stored counters")
    while True:
        try:
            count = await components.runtime.restore()
        except StoreUnavailable as error:
            retries.failed(error)
            await asyncio.sleep(RESTORE_RETRY_SECONDS)
            continue
        retries.succeeded()
        log.info("loaded %d stored sessions", count)
        components.restored.set()
        return
