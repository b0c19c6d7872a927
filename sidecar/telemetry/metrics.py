"""Every Prometheus metric of the sidecar, created on an injected registry. Names are the public contract.

Fleet-level metrics are prometheus_client objects. Per-session gauges are not: they are rendered at scrape time
straight from the session registry (sidecar.telemetry.session_families), which keeps a 10k-session scrape
under the goal and makes a forgotten session's series disappear by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from sidecar import __version__
from sidecar.rules.app_state import COLLECTIONS, OTHER_COLLECTION, AppStateKind
from sidecar.rules.classification import ErrorClass
from sidecar.rules.loss import Outcome
from sidecar.rules.policy import CRYPTO_LIMIT_REASONS, CloseReason, Heal, KeyScope, Limits
from sidecar.rules.records import ClosureRecord, PhoneRef, RecordDecision
from sidecar.rules.restrictions import Restriction
from sidecar.rules.safety import IncidentKind, Mode
from sidecar.runtime.observer import ErrorTotals, RuntimeObserver
from sidecar.telemetry.runtime_versions import RuntimeVersions

# A close waits on the runtime (usually 1-50 ms, up to --socket-end-timeout, 5 s by default) and on one
# PostgreSQL transaction (1-20 ms). Buckets from 1 ms to 10 s resolve both the healthy path and timeouts.
CLOSE_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Steps normally wait for the batch ahead of them (sub-millisecond to tens of ms); an outage makes them wait
# for minutes. Buckets from 1 ms to 10 min show both.
STEP_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0, 600.0)

# A direct delivery takes milliseconds; retries with backoff take seconds to hours.
NOTIFICATION_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 300.0, 3600.0)

UNTRACKED = str(Outcome.UNKNOWN)
EVENT_TYPES = ("connection.update", "decrypt.error", "account.restriction", "message.recovered", "command.ack")
CHANNELS = ("websocket", "http", "logs")
REJECT_REASONS = ("invalid", "malformed", "too_many_events", "binary")
HEAL_KINDS = ("bad_mac", "bad_decrypt")
CLOSE_SOCKET_OUTCOMES = ("ended", "timeout", "unreachable", "left_to_runtime", "failed")
INCIDENT_KINDS = frozenset(str(kind) for kind in IncidentKind)
SUPERVISED_TASKS = (
    "pending-steps", "restore", "schema-check", "owners-watch", "housekeeping", "owner-notifications", "effects",
    "restrictions", "message-loss",
)  # fmt: skip


class SidecarMetrics:
    def __init__(
        self, registry: CollectorRegistry, limits: Limits, team_of: Callable[[int], str] = lambda _: "unassigned"
    ) -> None:
        """`team_of(organization_id)`: the owning team's name (the owners file), for whatsapp_organization_team.
        No `_created` series: they were half of the fleet samples (one per counter and histogram child) and
        Prometheus drops them unless created-timestamp ingestion is on. prometheus_client keeps this switch
        process-wide, so it is set here, where the sidecar's metrics are made."""
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self.team_of = team_of
        self.error_limit = Gauge(
            "whatsapp_session_error_limit",
            "Configured error limit that closes a session",
            ["kind"],
            registry=registry,
        )
        self.error_limit.labels("bad_mac").set(limits.max_bad_mac_errors)
        self.error_limit.labels("bad_decrypt").set(limits.max_bad_decrypt_errors)
        self.decrypt_errors = Counter(
            "whatsapp_decrypt_errors",
            "Decryption errors reported by runtimes, by class",
            ["kind", "organization_id"],
            registry=registry,
        )
        self.app_state_sync_failures = Counter(
            "whatsapp_app_state_sync_failures",
            "App-state sync failures reported by runtimes, by collection and kind (rules/app_state.py)",
            ["collection", "kind"],
            registry=registry,
        )
        for collection in (*COLLECTIONS, OTHER_COLLECTION):
            for app_state_kind in AppStateKind:
                self.app_state_sync_failures.labels(collection, str(app_state_kind))
        self.heals = Counter(
            "whatsapp_session_heals", "Heals started (keys deleted, session kept)", ["kind"], registry=registry
        )
        self.closes = Counter(
            "whatsapp_session_closes",
            "Sessions closed by the sidecar, by reason",
            ["reason", "organization_id"],
            registry=registry,
        )
        self.close_socket_outcomes = Counter(
            "whatsapp_session_close_socket_outcomes",
            "Closes by what became of the runtime's socket: ended (the runtime acknowledged session.end), timeout "
            "(no answer within --socket-end-timeout), unreachable (no runtime connection held the phone), "
            "left_to_runtime (ingest-logs: no runtime link, the backend handles its socket), failed (the runtime "
            "answered an error)",
            ["outcome"],
            registry=registry,
        )
        self.owed_ends_delivered = Counter(
            "whatsapp_session_owed_ends_delivered",
            "session.end commands delivered late: the close found no runtime connection (socket unreachable) and "
            "the runtime's phone showed up again (a reconnect with the same runtimeId, or any event of the phone)",
            registry=registry,
        )
        self.keys_deleted = Counter(
            "whatsapp_auth_keys_deleted", "Auth key rows deleted, by scope", ["scope"], registry=registry
        )
        self.heals_coalesced = Counter(
            "whatsapp_session_heals_coalesced",
            "Heals merged into the next heal of the same session instead of running on their own",
            ["kind"],
            registry=registry,
        )
        self.step_wait = Histogram(
            "whatsapp_sidecar_pending_step_wait_seconds",
            "Time a database step waited in the pending queue before it was applied",
            buckets=STEP_WAIT_BUCKETS,
            registry=registry,
        )
        self.events_throttled = Counter(
            "whatsapp_sidecar_events_throttled",
            "Events refused with 429 because the pending queue was full (nothing of them was applied)",
            registry=registry,
        )
        self.owner_notifications = Counter(
            "whatsapp_owner_notifications",
            "Owner webhook deliveries by outcome (delivered, retried, dead, skipped)",
            ["team", "event", "outcome"],
            registry=registry,
        )
        self.notification_latency = Histogram(
            "whatsapp_owner_notification_latency_seconds",
            "From the state change to the owner's webhook answering 2xx",
            buckets=NOTIFICATION_LATENCY_BUCKETS,
            registry=registry,
        )
        self.webhook_disabled = Gauge(
            "whatsapp_owner_webhook_disabled",
            "1 while a team's webhook is disabled because it answered 410 Gone (until the owners file changes)",
            ["team"],
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "whatsapp_owner_outbox_depth", "Owner notifications waiting for delivery", registry=registry
        )
        self.close_duration = Histogram(
            "whatsapp_session_close_duration_seconds",
            "Time from a close decision to the session being forgotten",
            buckets=CLOSE_DURATION_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "whatsapp_sidecar_events", "Events received from runtimes", ["type", "channel"], registry=registry
        )
        self.events_rejected = Counter(
            "whatsapp_sidecar_events_rejected",
            "Frames or bodies refused before anything in them was applied",
            ["reason"],
            registry=registry,
        )
        self.runtime_connections = Gauge(
            "whatsapp_sidecar_runtime_connections", "Open runtime link connections", registry=registry
        )
        self.pending_steps = Gauge(
            "whatsapp_sidecar_pending_database_steps", "Database steps waiting to be applied", registry=registry
        )
        self.tracked_sessions = Gauge(
            "whatsapp_sidecar_sessions", "Sessions the sidecar tracks, by state", ["state"], registry=registry
        )
        self.organization_team = Gauge(
            "whatsapp_organization_team_info",
            "The team that owns each organization seen (join on organization_id to label fleet series by team)",
            ["organization_id", "team"],
            registry=registry,
        )
        self.deaf_sessions = Gauge(
            "whatsapp_sidecar_deaf_sessions",
            "Sessions found deaf (connected, nothing arrives) and not recovered yet",
            registry=registry,
        )
        self.liveness_watched = Gauge(
            "whatsapp_sidecar_liveness_watched_sessions",
            "Sessions the liveness watch follows (those whose runtime reported inbound activity or a connection)",
            registry=registry,
        )
        self.restart_breaker_tripped = Gauge(
            "whatsapp_sidecar_restart_breaker_tripped",
            "1 while too many deaf-session restarts in the breaker window hold further ones (an operator releases it)",
            registry=registry,
        )
        self.breaker_tripped = Gauge(
            "whatsapp_sidecar_breaker_tripped",
            "1 while the fleet circuit breaker holds automatic logouts (an operator must release it)",
            registry=registry,
        )
        self.held_sessions = Gauge(
            "whatsapp_sidecar_held_sessions", "Sessions at a limit, held by the circuit breaker", registry=registry
        )
        self.mode = Gauge(
            "whatsapp_sidecar_mode", "1 for the mode in force (enforce or observe)", ["mode"], registry=registry
        )
        self.observed_organizations = Gauge(
            "whatsapp_sidecar_observed_organizations",
            "Organizations kept in observe mode while the rest enforce",
            registry=registry,
        )
        self.holds = Counter(
            "whatsapp_session_holds",
            "Limits reached while the breaker held automatic logouts",
            ["reason", "organization_id"],
            registry=registry,
        )
        self.incidents = Counter(
            "whatsapp_session_incidents",
            "Logouts that did not stick, reconnect loops, credentials shared by two runtimes",
            ["kind", "organization_id"],
            registry=registry,
        )
        self.restrictions = Counter(
            "whatsapp_session_restrictions",
            "Restrictions that started on a number (account.restriction), by kind",
            ["kind", "organization_id"],
            registry=registry,
        )
        self.undecryptable = Counter(
            "whatsapp_messages_undecryptable",
            "Messages that failed to decrypt (decrypt.error with a messageId), whether recovered later or not",
            ["organization_id"],
            registry=registry,
        )
        self.recovered = Counter(
            "whatsapp_messages_recovered",
            "Failed messages that arrived after all (message.recovered): re-sent after a retry receipt, a "
            "placeholder resend, or other",
            ["organization_id", "via"],
            registry=registry,
        )
        self.untracked = Counter(
            "whatsapp_messages_untracked",
            "Failed messages beyond the session's bound of pending ids: counted, but neither recovered nor lost can "
            "be said of them",
            ["organization_id"],
            registry=registry,
        )
        self.lost = Counter(
            "whatsapp_messages_lost",
            "Failed messages not recovered within --loss-deadline",
            ["organization_id"],
            registry=registry,
        )
        self.unsettled = Gauge(
            "whatsapp_messages_unsettled",
            "Failed messages past --loss-deadline waiting for the loss ledger (PostgreSQL away): not counted lost "
            "until the replicas can agree",
            registry=registry,
        )
        self.runtime_versions = RuntimeVersions()
        registry.register(self.runtime_versions)
        self.task_failures = Counter(
            "whatsapp_sidecar_task_failures",
            "Background tasks that raised an unexpected error (each is logged with its traceback and restarted)",
            ["task"],
            registry=registry,
        )
        self.steps_failed = Counter(
            "whatsapp_sidecar_steps_failed",
            "Database steps dropped: failed on their own (a constraint, bad data) or timed out every attempt",
            ["kind", "reason"],
            registry=registry,
        )
        self.observer_failures = Counter(
            "whatsapp_sidecar_observer_failures",
            "Notifications an observer (logs, metrics, closure log, tracing) raised on; the transition went on",
            ["observer"],
            registry=registry,
        )
        self.retention_deleted = Counter(
            "whatsapp_sidecar_retention_deleted",
            "Rows deleted by retention (--retention), by table",
            ["table"],
            registry=registry,
        )
        self.sessions_expired = Counter(
            "whatsapp_sidecar_sessions_expired",
            "Sessions forgotten after holding nothing for --state-ttl (active, no counts, disconnected)",
            registry=registry,
        )
        self.undecided_events = Gauge(
            "whatsapp_sidecar_undecided_events",
            "Events accepted and waiting for their decision (fleet mode: while PostgreSQL is away or slow; 0 with "
            "one replica, which decides at once)",
            registry=registry,
        )
        self.oldest_undecided_event_age = Gauge(
            "whatsapp_sidecar_oldest_undecided_event_age_seconds",
            "Seconds the oldest undecided event has waited (0 with none): the accepted-to-decided lag",
            registry=registry,
        )
        self.phones_waiting_on_locks = Gauge(
            "whatsapp_sidecar_phones_waiting_on_locks",
            "Fleet mode: phones whose events wait on a row or lock another PostgreSQL session holds (retried, "
            "never dropped; the other phones are decided meanwhile)",
            registry=registry,
        )
        self.clock_offset = Gauge(
            "whatsapp_sidecar_clock_offset_seconds",
            "Fleet mode: seconds this replica's clock is ahead of PostgreSQL's (negative: behind); shared "
            "decisions use PostgreSQL's time, so this is a hygiene signal, not an error",
            registry=registry,
        )
        self.pending_step_age = Gauge(
            "whatsapp_sidecar_pending_step_age_seconds",
            "Age of the oldest database step not yet applied: how far durable state lags what was accepted",
            registry=registry,
        )
        build = Gauge("whatsapp_sidecar_build_info", "Build of this sidecar", ["version"], registry=registry)
        build.labels(__version__).set(1)
        # Known label values start at zero so rate() and absent() behave from the first scrape.
        for kind in HEAL_KINDS:
            self.heals.labels(kind)
            self.heals_coalesced.labels(kind)
        for scope in KeyScope:
            self.keys_deleted.labels(str(scope))
        for outcome in CLOSE_SOCKET_OUTCOMES:
            self.close_socket_outcomes.labels(outcome)
        for event_type in EVENT_TYPES:
            for channel in CHANNELS:
                self.events.labels(event_type, channel)
        for reason in REJECT_REASONS:
            self.events_rejected.labels(reason)
        for task in SUPERVISED_TASKS:
            self.task_failures.labels(task)
        self._organizations: set[int] = set()

    def teams_changed(self) -> None:
        """After an owners reload: the info series follow the new mapping."""
        self.organization_team.clear()
        for organization_id in self._organizations:
            self.organization_team.labels(str(organization_id), self.team_of(organization_id)).set(1)

    def bind(
        self,
        connections: Callable[[], float],
        pending: Callable[[], float],
        active: Callable[[], float],
        closed: Callable[[], float],
        pending_age: Callable[[], float] = lambda: 0.0,
        undecided: Callable[[], float] = lambda: 0.0,
        undecided_age: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """Gauges read at scrape time from the live parts."""
        self.undecided_events.set_function(undecided)
        self.oldest_undecided_event_age.set_function(undecided_age)
        self.runtime_connections.set_function(connections)
        self.pending_steps.set_function(pending)
        self.pending_step_age.set_function(pending_age)
        self.tracked_sessions.labels("active").set_function(active)
        self.tracked_sessions.labels("closed").set_function(closed)

    def bind_fleet(
        self, waiting_on_locks: Callable[[], int], clock_ahead: Callable[[], float], unsettled: Callable[[], int]
    ) -> None:
        self.phones_waiting_on_locks.set_function(lambda: float(waiting_on_locks()))
        self.clock_offset.set_function(clock_ahead)
        self.unsettled.set_function(lambda: float(unsettled()))

    def bind_liveness(
        self, deaf: Callable[[], int], watched: Callable[[], int], restarts_tripped: Callable[[], bool]
    ) -> None:
        self.deaf_sessions.set_function(lambda: float(deaf()))
        self.liveness_watched.set_function(lambda: float(watched()))
        self.restart_breaker_tripped.set_function(lambda: float(restarts_tripped()))

    def bind_safety(
        self,
        tripped: Callable[[], bool],
        held: Callable[[], int],
        mode: Callable[[], Mode],
        observed_organizations: Callable[[], int],
    ) -> None:
        self.breaker_tripped.set_function(lambda: float(tripped()))
        self.held_sessions.set_function(lambda: float(held()))
        for each in Mode:
            self.mode.labels(str(each)).set_function(_is_mode(mode, each))
        self.observed_organizations.set_function(lambda: float(observed_organizations()))

    def organization_seen(self, organization_id: int) -> str:
        label = str(organization_id)
        if organization_id not in self._organizations:
            self._organizations.add(organization_id)
            for kind in ErrorClass:
                self.decrypt_errors.labels(str(kind), label)
            for reason in CloseReason:
                self.closes.labels(str(reason), label)
            for incident in INCIDENT_KINDS:
                self.incidents.labels(incident, label)
            for reason in CRYPTO_LIMIT_REASONS:
                self.holds.labels(str(reason), label)
            self.organization_team.labels(label, self.team_of(organization_id)).set(1)
        return label


def _is_mode(current: Callable[[], Mode], mode: Mode) -> Callable[[], float]:
    return lambda: float(current() is mode)


class MetricsObserver(RuntimeObserver):
    """Feeds the fleet-level counters from the runtime's notifications."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self._m = metrics
        self._decrypt_children: dict[tuple[ErrorClass, int], Any] = {}
        self._undecryptable_children: dict[int, Any] = {}

    def connection_changed(self, phone: PhoneRef, connected: bool) -> None:
        self._m.organization_seen(phone.organization_id)

    def decrypt_error(self, phone: PhoneRef, error_class: ErrorClass) -> None:
        self._decrypt_child(error_class, phone.organization_id).inc()

    def errors_tallied(self, totals: ErrorTotals) -> None:
        for (error_class, organization_id), count in totals.by_class.items():
            self._decrypt_child(error_class, organization_id).inc(count)
        for (collection, kind), count in totals.app_state.items():
            self._m.app_state_sync_failures.labels(collection, str(kind)).inc(count)
        for (organization_id, outcome), count in totals.undecryptable.items():
            child = self._undecryptable_children.get(organization_id)
            if child is None:
                organization = self._m.organization_seen(organization_id)
                child = self._undecryptable_children[organization_id] = self._m.undecryptable.labels(organization)
            child.inc(count)
            if outcome == UNTRACKED:
                self._m.untracked.labels(self._m.organization_seen(organization_id)).inc(count)

    def _decrypt_child(self, error_class: ErrorClass, organization_id: int) -> Any:
        key = (error_class, organization_id)
        child = self._decrypt_children.get(key)
        if child is None:  # labels() takes a lock and builds a key; once per class and organization is enough
            organization = self._m.organization_seen(organization_id)
            child = self._decrypt_children[key] = self._m.decrypt_errors.labels(str(error_class), organization)
        return child

    def app_state_failure(self, phone: PhoneRef, collection: str, kind: AppStateKind) -> None:
        self._m.app_state_sync_failures.labels(collection, str(kind)).inc()

    def healed(
        self, phone: PhoneRef, heal: Heal, keys_deleted: int | None, database: str, socket: str, duration: float
    ) -> None:
        self._m.heals.labels("bad_decrypt" if heal.scope is KeyScope.APP_STATE_SYNC else "bad_mac").inc()
        if keys_deleted:
            self._m.keys_deleted.labels(str(heal.scope)).inc(keys_deleted)

    def heal_coalesced(self, phone: PhoneRef, heal: Heal) -> None:
        self._m.heals_coalesced.labels("bad_decrypt" if heal.scope is KeyScope.APP_STATE_SYNC else "bad_mac").inc()

    def decided(self, decision: RecordDecision) -> None:
        if decision.phone is None:
            return
        organization = self._m.organization_seen(decision.phone.organization_id)
        if decision.decision in INCIDENT_KINDS:
            self._m.incidents.labels(decision.decision, organization).inc()
        elif decision.decision == "session.held":
            self._m.holds.labels(str(decision.detail.get("reason")), organization).inc()

    def message_undecryptable(self, phone: PhoneRef, outcome: str) -> None:
        organization = self._m.organization_seen(phone.organization_id)
        self._m.undecryptable.labels(organization).inc()
        if outcome == UNTRACKED:
            self._m.untracked.labels(organization).inc()

    def message_recovered(self, phone: PhoneRef, via: str, known: bool) -> None:
        self._m.recovered.labels(self._m.organization_seen(phone.organization_id), via).inc()

    def messages_lost(self, phone: PhoneRef, count: int) -> None:
        self._m.lost.labels(self._m.organization_seen(phone.organization_id)).inc(count)

    def restriction_changed(self, phone: PhoneRef, restriction: Restriction, change: str) -> None:
        if change == "started":
            organization = self._m.organization_seen(phone.organization_id)
            self._m.restrictions.labels(str(restriction.kind), organization).inc()

    def closed(self, record: ClosureRecord) -> None:
        organization = self._m.organization_seen(record.phone.organization_id)
        self._m.closes.labels(str(record.reason), organization).inc()
        outcome = record.socket.partition(":")[0] if record.socket else "failed"
        self._m.close_socket_outcomes.labels(outcome if outcome in CLOSE_SOCKET_OUTCOMES else "failed").inc()
        if record.keys_deleted:
            self._m.keys_deleted.labels(str(KeyScope.ALL)).inc(record.keys_deleted)
        if record.duration_seconds is not None:
            context = trace.get_current_span().get_span_context()
            exemplar = {"trace_id": format(context.trace_id, "032x")} if context.is_valid else None
            self._m.close_duration.observe(record.duration_seconds, exemplar=exemplar)
