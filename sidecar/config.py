"""One frozen config, from command-line flags and WA_SIDECAR_* environment variables, validated once.

Each setting is declared once here (flag, variable, default, meaning); config_values.py reads one setting's text.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sidecar.config_values import (
    ConfigError,
    bearer_token,
    boolean,
    duration,
    listen_address,
    organization_teams,
    positive_float,
    positive_int,
    status_codes,
)
from sidecar.keystores.spec import KeyPlace, KeyStoreSpec, parse_key_store
from sidecar.rules.liveness import DeafAction, LivenessConfig
from sidecar.rules.loss import DEFAULT_DEADLINE_SECONDS as DEFAULT_LOSS_DEADLINE
from sidecar.rules.policy import DEFAULT_CRITICAL_STATUS_CODES, HealthPolicy, Limits, PolicyConfig
from sidecar.rules.safety import BreakerConfig, Mode
from sidecar.store.sqlnames import InvalidIdentifier, quote_identifier, quote_qualified
from sidecar.telemetry.exported import DEFAULT_WINDOW_SECONDS, SessionMetrics

ENV_PREFIX = "WA_SIDECAR_"
# Settings read only from the environment (secrets stay out of process listings); docs/reference lists them.
ENVIRONMENT_ONLY = {
    "API_TOKEN": "bearer token the operator endpoints (mutating routes) require; refused on a public listener "
    "without it unless --insecure; at least 16 characters",
    "RUNTIME_TOKEN": "bearer token runtimes present on /v1/runtime and POST /v1/events; at least 16 characters",
}
ENV_NAMES = {"--schema-override": "SCHEMA_OVERRIDES"}  # read as k=v,k=v


def env_name(flag: str) -> str:
    """The environment variable a flag of add_config_arguments is also read from."""
    return ENV_PREFIX + ENV_NAMES.get(flag, flag[2:].replace("-", "_").upper())


DEFAULT_TEAM = "unassigned"
POOLERS = ("none", "session", "transaction")  # behind either pooler, timeouts are set per transaction


@dataclass(frozen=True, slots=True)
class SchemaMapping:
    """Where the runtime's own tables live. The defaults are the seed backend's Prisma schema."""

    sidecar_schema: str = "wa_sidecar"
    auth_table: str = "baileys_auth"
    auth_organization_column: str = "organizationId"
    auth_phone_column: str = "phoneJid"
    auth_key_column: str = "key"
    phone_table: str = "OrganizationPhone"
    phone_id_column: str = "id"
    phone_organization_column: str = "organizationId"
    phone_jid_column: str = "phoneJid"
    phone_status_column: str = "status"
    phone_qr_column: str = "qrCode"
    phone_last_connected_column: str = "lastConnectedAt"
    phone_updated_column: str = "updatedAt"
    logged_out_status: str = "logged_out"

    def validate(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "logged_out_status":
                if not value or len(value) > 64:
                    raise ConfigError(f"schema.{item.name}", "must be 1 to 64 characters")
                continue
            try:
                quote_qualified(value) if item.name.endswith("_table") else quote_identifier(value)
            except InvalidIdentifier as error:
                raise ConfigError(f"schema.{item.name}", str(error)) from None


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9464
    database_url: str | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    schema: SchemaMapping = field(default_factory=SchemaMapping)
    # Where the phones' auth keys are (keystores/spec.py): the session store's table by default.
    key_store: KeyStoreSpec = field(default_factory=KeyStoreSpec)
    socket_end_timeout: float = 5.0
    # How long a close waits for its database steps before it answers with them still pending.
    database_step_timeout: float = 5.0
    pending_steps_limit: int = 100_000
    closure_log_path: Path | None = None
    state_dir: Path | None = None
    api_token: str | None = None
    runtime_token: str | None = None
    insecure: bool = False
    instance: str = field(default_factory=socket.gethostname)
    log_level: str = "INFO"
    # organizationId -> team, the `team` label of per-session metrics (the owners file supersedes it later).
    organization_teams: Mapping[int, str] = field(default_factory=dict)
    owners_file: Path | None = None
    webhook_max_attempts: int = 8
    webhook_timeout: float = 5.0
    webhook_backoff_initial: float = 1.0
    mode: Mode = Mode.ENFORCE
    observe_organizations: frozenset[int] = frozenset()
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    logout_stick_seconds: float = 3600.0
    # With a database: "fleet" (default) decides in PostgreSQL, shared by any number of replicas; "local"
    # decides in this process (one replica only; counts and closes continue while PostgreSQL is away).
    coordination: str = "fleet"
    # Fleet mode: a close not finished within this many seconds (its replica died) is finished by another one.
    close_lease_seconds: float = 60.0
    database_command_timeout: float = 30.0
    # What sits between the sidecar and PostgreSQL: "none" (direct, or PgBouncer in session mode) or "transaction"
    # (PgBouncer in transaction mode: no named prepared statements, no LISTEN; routed commands are polled).
    database_pooler: str = "none"
    loss_deadline: float = DEFAULT_LOSS_DEADLINE  # a failed message not recovered within it is lost (rules/loss.py)
    state_ttl: float = 86_400.0  # sessions holding nothing, closed/logged-out markers: forgotten after a day
    retention: float = 30 * 86_400.0  # closures, decisions, finished notifications: deleted after 30 days
    # Deaf sessions (rules/liveness.py): what to do (none: report only; restart) and the watch's thresholds.
    deaf_action: DeafAction = DeafAction.NONE
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    liveness_tick: float = 5.0
    # Which sessions get their own series on /metrics (telemetry/exported.py), and how long an active one keeps them.
    session_metrics: SessionMetrics = SessionMetrics.ACTIVE
    session_metrics_window: float = DEFAULT_WINDOW_SECONDS
    # A client that takes longer to send a request body gets 408 (slow or stalled clients hold no connection).
    request_body_timeout: float = 10.0
    # ... and one slower to send its request head (or idle between keep-alive requests) is disconnected.
    request_header_timeout: float = 15.0

    @property
    def fleet_mode(self) -> bool:
        return self.database_url is not None and self.coordination == "fleet"

    def team_of(self, organization_id: int) -> str:
        return self.organization_teams.get(organization_id, DEFAULT_TEAM)

    @property
    def listens_on_loopback(self) -> bool:
        if self.listen_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.listen_host).is_loopback
        except ValueError:
            return False

    def check_exposure(self) -> None:
        """Refuse an unauthenticated listener outside loopback unless the operator said --insecure."""
        if not self.listens_on_loopback and not (self.api_token and self.runtime_token) and not self.insecure:
            raise ConfigError(
                "listen",
                f"{self.listen_host} is not a loopback address and WA_SIDECAR_API_TOKEN / WA_SIDECAR_RUNTIME_TOKEN "
                "are not both set; set them, or pass --insecure to accept an open listener",
            )


LISTENING, TELEMETRY, DATABASE, RULES, FLEET, LIVENESS, OWNERS = (
    "listening and access",
    "metrics",
    "database",
    "session rules",
    "fleet and safety",
    "liveness (deaf sessions)",
    "owners, webhooks and the closure log",
)
GROUP_OF = {
    **dict.fromkeys(("--listen", "--insecure", "--request-header-timeout", "--request-body-timeout", "--instance",
                     "--log-level"), LISTENING),
    **dict.fromkeys(("--session-metrics", "--session-metrics-window"), TELEMETRY),
    **dict.fromkeys(("--database-url", "--database-pooler", "--database-command-timeout", "--database-step-timeout",
                     "--pending-steps-limit", "--state-dir", "--schema-override", "--key-store", "--retention",
                     "--state-ttl"),
                    DATABASE),
    **dict.fromkeys(("--max-bad-mac-errors", "--max-bad-decrypt-errors", "--delete-prekeys-on-heal",
                     "--critical-status-codes", "--socket-end-timeout", "--health-policy", "--health-window",
                     "--loss-deadline"), RULES),
    **dict.fromkeys(("--coordination", "--close-lease-seconds", "--mode", "--observe-organizations",
                     "--breaker-max-closes", "--breaker-max-share", "--breaker-window", "--logout-stick-seconds"),
                    FLEET),
    **dict.fromkeys(("--deaf-action", "--deaf-floor", "--deaf-gap-factor", "--deaf-confirm", "--deaf-min-history",
                     "--deaf-min-reports", "--liveness-tick"), LIVENESS),
    **dict.fromkeys(("--organization-teams", "--owners-file", "--webhook-max-attempts", "--webhook-timeout",
                     "--webhook-backoff-initial", "--closure-log"), OWNERS),
}  # fmt: skip
# `migrate` needs only where the database is and how its schema is named.
MIGRATE_FLAGS = frozenset({"--database-url", "--database-pooler", "--schema-override", "--log-level"})


def add_config_arguments(parser: argparse.ArgumentParser, only: frozenset[str] | None = None) -> None:
    """The settings, in groups; each also reads WA_SIDECAR_<NAME> (flag wins). `only`: the flags a command
    takes (every setting by default)."""
    groups = {
        title: parser.add_argument_group(title)
        for title in (LISTENING, TELEMETRY, DATABASE, RULES, FLEET, LIVENESS, OWNERS)
    }

    def add(flag: str, **kwargs: Any) -> None:
        if only is None or flag in only:
            groups[GROUP_OF[flag]].add_argument(flag, **kwargs)

    add("--listen", help="host:port to serve on (WA_SIDECAR_LISTEN, default 127.0.0.1:9464)")
    add(
        "--database-url",
        help="postgresql://… (WA_SIDECAR_DATABASE_URL); without it an embedded store is used",
    )
    add("--max-bad-mac-errors", help="Bad MAC limit that closes a session (default 3)")
    add("--max-bad-decrypt-errors", help="app-state bad decrypt limit that closes a session (default 5)")
    add("--delete-prekeys-on-heal", help="also delete pre-key-* on a Bad MAC heal: true/false (default false)")
    add(
        "--critical-status-codes",
        help="comma-separated close codes that close a session (default 401,403,411)",
    )
    add("--socket-end-timeout", help="seconds to wait for the runtime to end a socket (default 5)")
    add("--database-step-timeout", help="seconds a close waits for its database steps (default 5)")
    add("--pending-steps-limit", help="database steps kept while PostgreSQL is away (default 100000)")
    add("--closure-log", help="append every closure as one JSON line to this file (WA_SIDECAR_CLOSURE_LOG)")
    add("--state-dir", help="directory for the journal of pending database steps (WA_SIDECAR_STATE_DIR)")
    add("--schema-override", action="append", help="KEY=VALUE of the table mapping, repeatable; env: k=v,k=v")
    add(
        "--key-store",
        help="where the auth keys are: postgresql (the default with a database: the --schema-override table), "
        "redis://HOST:PORT/DB?key=TEMPLATE (a hash per phone), file:///DIR/{organizationPhoneId} (a "
        "useMultiFileAuthState folder per phone) or runtime (the runtime deletes them); placeholders "
        "{organizationId}, {organizationPhoneId}, {phone}",
    )
    add("--instance", help="name of this sidecar instance (default: host name)")
    add("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    add("--organization-teams", help="organizationId=team pairs, comma-separated, for the `team` metric label")
    add("--owners-file", help="YAML file mapping organizations/phones to teams and webhooks (WA_SIDECAR_OWNERS_FILE)")
    add("--webhook-max-attempts", help="deliveries tried before a notification is dead-lettered (default 8)")
    add("--webhook-timeout", help="seconds per webhook attempt (default 5)")
    add("--webhook-backoff-initial", help="first retry delay in seconds, doubled per attempt (default 1)")
    add("--insecure", action="store_true", default=None, help="allow a non-loopback listener without tokens")
    add(
        "--coordination",
        help="with a database: fleet (default; replicas share every decision through PostgreSQL) or local "
        "(one replica decides in memory)",
    )
    add("--request-header-timeout", help="seconds for a request head, and keep-alive idle time (default 15)")
    add("--request-body-timeout", help="seconds a client may take to send a request body (default 10)")
    add("--close-lease-seconds", help="fleet mode: seconds before another replica finishes a close (default 60)")
    add(
        "--state-ttl",
        help="forget sessions holding nothing and closed markers after this long (e.g. 12h, 1d; default 1d)",
    )
    add(
        "--loss-deadline",
        help="a message that failed to decrypt and is not recovered (re-sent) within this is lost (e.g. 90s, 5m; "
        "default 5m: Baileys and whatsmeow finish their retries within a minute)",
    )
    add("--retention", help="delete closures, decisions and sent notifications older than this (default 30d)")
    add(
        "--database-pooler",
        help="none (direct, the default), session (PgBouncer in session mode) or transaction (PgBouncer in "
        "transaction mode: no named prepared statements, no LISTEN; commands between replicas are polled every "
        "second); behind a pooler each transaction sets its own timeouts",
    )
    add(
        "--database-command-timeout",
        help="seconds one SQL statement may run before it counts as slow (retried 3 times, then failed; default 30)",
    )
    add("--deaf-action", help="a deaf session (connected, nothing arrives): none (default, report only) or restart")
    add("--deaf-floor", help="silence never suspect below this (e.g. 10m; default 10m)")
    add("--deaf-gap-factor", help="suspect after this many times the session's longest recent gap (default 4)")
    add("--deaf-confirm", help="silence this long after a successful probe makes it deaf (default 5m)")
    add("--deaf-min-history", help="judge a session once its traffic history spans this long (default 1d)")
    add("--deaf-min-reports", help="activity reports with traffic before a session has a baseline (default 10)")
    add("--liveness-tick", help="seconds between liveness checks (default 5)")
    add("--mode", help="enforce (default) or observe: decide and report everything, delete no key, end no socket")
    add("--observe-organizations", help="organization ids kept in observe mode while the rest enforce, comma-separated")
    add("--breaker-max-closes", help="automatic logouts allowed per breaker window before it trips (default 20)")
    add("--breaker-max-share", help="... or this share of live sessions, whichever is larger (default 0.1)")
    add("--breaker-window", help="circuit breaker window in seconds (default 300)")
    add("--logout-stick-seconds", help="an open this soon after a sidecar logout, without a new login, is an incident "
        "and is ended again (default 3600)")  # fmt: skip
    add(
        "--health-policy",
        help="counters (the seed's, default), windowed (distinct failing peers in a window) or loss-aware (a Bad "
        "MAC with a messageId counts only once its --loss-deadline passes unrecovered)",
    )
    add("--health-window", help="the windowed policy's window in seconds (default 600)")
    add(
        "--session-metrics",
        help="which sessions get their own series on /metrics: active (default: a counter, unhealthy, held, deaf, "
        "or an error within the window), all, or none; fleet families are complete in every mode",
    )
    add("--session-metrics-window", help="an active session keeps its series this long after (e.g. 30m; default 1h)")


def _setting(args: argparse.Namespace, env: Mapping[str, str], name: str) -> str | None:
    value = getattr(args, name, None)
    if value is not None:
        return str(value)
    return env.get(ENV_PREFIX + name.upper())


def _schema(overrides: list[str]) -> SchemaMapping:
    known = {item.name for item in fields(SchemaMapping)}
    values: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError("schema-override", f"expected KEY=VALUE, got {item!r}")
        if key not in known:
            raise ConfigError(f"schema.{key}", f"unknown key; known keys: {', '.join(sorted(known))}")
        values[key] = value.strip()
    mapping = replace(SchemaMapping(), **values)
    mapping.validate()
    return mapping


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env

    def setting(name: str) -> str | None:
        return _setting(args, env, name)

    config = Config()
    changes: dict[str, object] = {}
    if (raw := setting("listen")) is not None:
        changes["listen_host"], changes["listen_port"] = listen_address(raw)
    if (raw := setting("database_url")) is not None and raw.strip():
        if not raw.startswith(("postgres://", "postgresql://")):
            raise ConfigError("database-url", "must start with postgresql:// or postgres://")
        changes["database_url"] = raw
    if (raw := setting("key_store")) is not None and raw.strip():
        spec = parse_key_store(raw)
        if spec.place is KeyPlace.DATABASE and "database_url" not in changes:
            raise ConfigError("key-store", "postgresql needs --database-url (without one the keys are the embedded "
                              "store's; name redis://…, file:///… or runtime)")  # fmt: skip
        changes["key_store"] = spec
    limits = Limits()
    if (raw := setting("max_bad_mac_errors")) is not None:
        limits = replace(limits, max_bad_mac_errors=positive_int("max-bad-mac-errors", raw))
    if (raw := setting("max_bad_decrypt_errors")) is not None:
        limits = replace(limits, max_bad_decrypt_errors=positive_int("max-bad-decrypt-errors", raw))
    policy = PolicyConfig(limits=limits)
    if (raw := setting("health_policy")) is not None:
        if raw not in {item.value for item in HealthPolicy}:
            raise ConfigError("health-policy", f"must be counters, windowed or loss-aware, got {raw!r}")
        policy = replace(policy, health=HealthPolicy(raw))
    if (raw := setting("health_window")) is not None:
        policy = replace(policy, window_seconds=positive_float("health-window", raw))
    if (raw := setting("delete_prekeys_on_heal")) is not None:
        policy = replace(policy, delete_prekeys_on_heal=boolean("delete-prekeys-on-heal", raw))
    raw = setting("critical_status_codes")
    policy = replace(policy, critical_status_codes=DEFAULT_CRITICAL_STATUS_CODES if raw is None else status_codes(raw))
    changes["policy"] = policy
    for name in ("socket_end_timeout", "database_step_timeout"):
        if (raw := setting(name)) is not None:
            changes[name] = positive_float(name.replace("_", "-"), raw)
    if (raw := setting("pending_steps_limit")) is not None:
        changes["pending_steps_limit"] = positive_int("pending-steps-limit", raw)
    if (raw := setting("closure_log")) is not None and raw:
        changes["closure_log_path"] = Path(raw)
    if (raw := setting("state_dir")) is not None and raw:
        changes["state_dir"] = Path(raw)
    overrides = list(getattr(args, "schema_override", None) or [])
    if not overrides and (raw := env.get(ENV_PREFIX + "SCHEMA_OVERRIDES")):
        overrides = [part for part in raw.split(",") if part.strip()]
    changes["schema"] = _schema(overrides)
    if (raw := setting("instance")) is not None and raw:
        changes["instance"] = raw
    if (raw := setting("log_level")) is not None:
        level = raw.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError("log-level", f"must be DEBUG, INFO, WARNING or ERROR, got {raw!r}")
        changes["log_level"] = level
    if (raw := setting("owners_file")) is not None and raw:
        changes["owners_file"] = Path(raw)
    if (raw := setting("webhook_max_attempts")) is not None:
        changes["webhook_max_attempts"] = positive_int("webhook-max-attempts", raw)
    for name in ("webhook_timeout", "webhook_backoff_initial"):
        if (raw := setting(name)) is not None:
            changes[name] = positive_float(name.replace("_", "-"), raw)
    if (raw := setting("organization_teams")) is not None:
        changes["organization_teams"] = organization_teams(raw)
    for name in ("api_token", "runtime_token"):  # ENVIRONMENT_ONLY
        variable = ENV_PREFIX + name.upper()
        changes[name] = bearer_token(variable, raw) if (raw := env.get(variable)) else None
    if (raw := setting("insecure")) is not None:
        changes["insecure"] = boolean("insecure", raw)
    if (raw := setting("coordination")) is not None:
        if raw not in ("fleet", "local"):
            raise ConfigError("coordination", f"must be fleet or local, got {raw!r}")
        changes["coordination"] = raw
    if (raw := setting("request_header_timeout")) is not None:
        changes["request_header_timeout"] = positive_float("request-header-timeout", raw)
    if (raw := setting("request_body_timeout")) is not None:
        changes["request_body_timeout"] = positive_float("request-body-timeout", raw)
    if (raw := setting("close_lease_seconds")) is not None:
        changes["close_lease_seconds"] = positive_float("close-lease-seconds", raw)
    if (raw := setting("loss_deadline")) is not None:
        changes["loss_deadline"] = duration("loss-deadline", raw)
    if (raw := setting("state_ttl")) is not None:
        changes["state_ttl"] = duration("state-ttl", raw)
    if (raw := setting("retention")) is not None:
        changes["retention"] = duration("retention", raw)
    if (raw := setting("database_pooler")) is not None:
        if raw.strip() not in POOLERS:
            raise ConfigError("database-pooler", f"must be one of {', '.join(POOLERS)}, got {raw!r}")
        changes["database_pooler"] = raw.strip()
    if (raw := setting("database_command_timeout")) is not None:
        changes["database_command_timeout"] = positive_float("database-command-timeout", raw)
    if (raw := setting("deaf_action")) is not None:
        if raw not in {item.value for item in DeafAction}:
            raise ConfigError("deaf-action", f"must be none or restart, got {raw!r}")
        changes["deaf_action"] = DeafAction(raw)
    liveness = LivenessConfig()
    if (raw := setting("deaf_floor")) is not None:
        liveness = replace(liveness, floor_seconds=duration("deaf-floor", raw))
    if (raw := setting("deaf_gap_factor")) is not None:
        factor = positive_float("deaf-gap-factor", raw)
        if factor < 1:
            raise ConfigError("deaf-gap-factor", f"must be at least 1, got {raw!r}")
        liveness = replace(liveness, gap_factor=factor)
    if (raw := setting("deaf_confirm")) is not None:
        liveness = replace(liveness, confirm_seconds=duration("deaf-confirm", raw))
    if (raw := setting("deaf_min_history")) is not None:
        liveness = replace(liveness, min_history_seconds=duration("deaf-min-history", raw))
    if (raw := setting("deaf_min_reports")) is not None:
        liveness = replace(liveness, min_reports=positive_int("deaf-min-reports", raw))
    changes["liveness"] = liveness
    if (raw := setting("liveness_tick")) is not None:
        changes["liveness_tick"] = positive_float("liveness-tick", raw)
    if (raw := setting("mode")) is not None:
        if raw not in {item.value for item in Mode}:
            raise ConfigError("mode", f"must be enforce or observe, got {raw!r}")
        changes["mode"] = Mode(raw)
    if (raw := setting("observe_organizations")) is not None:
        ids = [part.strip() for part in raw.split(",") if part.strip()]
        changes["observe_organizations"] = frozenset(positive_int("observe-organizations", item) for item in ids)
    breaker = BreakerConfig()
    if (raw := setting("breaker_max_closes")) is not None:
        breaker = replace(breaker, max_closes=positive_int("breaker-max-closes", raw))
    if (raw := setting("breaker_max_share")) is not None:
        share = positive_float("breaker-max-share", raw)
        if share > 1:
            raise ConfigError("breaker-max-share", f"must be a share from 0 to 1, got {raw!r}")
        breaker = replace(breaker, max_share=share)
    if (raw := setting("breaker_window")) is not None:
        breaker = replace(breaker, window_seconds=positive_float("breaker-window", raw))
    changes["breaker"] = breaker
    if (raw := setting("session_metrics")) is not None:
        if raw not in {item.value for item in SessionMetrics}:
            raise ConfigError("session-metrics", f"must be active, all or none, got {raw!r}")
        changes["session_metrics"] = SessionMetrics(raw)
    if (raw := setting("session_metrics_window")) is not None:
        changes["session_metrics_window"] = duration("session-metrics-window", raw)
    if (raw := setting("logout_stick_seconds")) is not None:
        changes["logout_stick_seconds"] = positive_float("logout-stick-seconds", raw)
    return replace(config, **changes)  # type: ignore[arg-type]


__all__ = [
    "ENVIRONMENT_ONLY",
    "ENV_NAMES",
    "ENV_PREFIX",
    "Config",
    "ConfigError",
    "SchemaMapping",
    "add_config_arguments",
    "config_from_args",
    "env_name",
]
