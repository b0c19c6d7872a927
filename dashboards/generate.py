"""Builds the Grafana dashboards from code; the JSON beside this file is the committed output.

    python -m dashboards.generate          # rewrite dashboards/*.json
    python -m dashboards.generate --check  # exit 1 when the committed JSON differs (CI)

Every panel states its unit; every rate uses $__rate_interval; every query filters on $job.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
# Every query names the scrape target: an optional cluster label (matches series without one), the job, the replica.
JOB = 'job=~"$job", instance=~"$instance", cluster=~"$cluster"'
SESSION = f'{JOB}, organization_id=~"$organization_id", team=~"$team"'
ORGANIZATION = f'{JOB}, organization_id=~"$organization_id"'
CRYPTO_CLOSE = 'reason=~"bad_mac_limit|bad_decrypt_limit"'

Json = dict[str, Any]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    description: str = ""
    overrides: tuple[Json, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Row:
    """A row header: the panels after it, up to the next row, belong to it."""

    title: str


def query(expr: str, legend: str = "", instant: bool = False) -> Query:
    return Query(expr, legend, instant)


def _target(item: Query, ref: str) -> Json:
    target: Json = {"datasource": DATASOURCE, "expr": item.expr, "refId": ref}
    if item.legend:
        target["legendFormat"] = item.legend
    if item.instant:
        target |= {"instant": True, "range": False, "format": "table"}
    return target


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> Json:
    built: Json = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": list(panel.overrides)},
        "targets": [_target(item, chr(ord("A") + index)) for index, item in enumerate(panel.queries)],
        "options": {},
    }
    if panel.description:
        built["description"] = panel.description
    if panel.kind == "table":
        built["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    return built


def _variable(name: str, label: str, definition: str, multi: bool = True) -> Json:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": definition, "refId": f"{name}-query"},
        "refresh": 2,
        "includeAll": multi,
        "multi": multi,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 3,
    }


def _dashboard(uid: str, title: str, description: str, variables: list[Json], panels: list[Panel | Row]) -> Json:
    laid_out: list[Json] = []
    x = y = row_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        if isinstance(panel, Row):
            y, x, row_height = y + row_height, 0, 0
            laid_out.append({"id": panel_id, "type": "row", "title": panel.title, "collapsed": False,
                             "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
            y += 1
            continue
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        laid_out.append(_panel(panel, panel_id, x, y))
        x, row_height = x + panel.width, max(row_height, panel.height)
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": False, "text": "default", "value": "default"},
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["whatsapp", "whatsapp-session-sidecar"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": [datasource, *variables]},
        "annotations": {"list": []},
        "links": [
            {
                "title": "WhatsApp dashboards",
                "type": "dashboards",
                "tags": ["whatsapp-session-sidecar"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "targetBlank": False,
                "icon": "external link",
                "tooltip": "the other whatsapp-session-sidecar dashboards, with these variables and time range",
                "url": "",
            }
        ],
        "panels": laid_out,
    }


# The unhealthy-sessions table's phone ids open the session dashboard with that phone, its organization, the same
# job and time range.
SESSION_LINK: Json = {
    "matcher": {"id": "byName", "options": "organization_phone_id"},
    "properties": [
        {
            "id": "links",
            "value": [
                {
                    "title": "Session dashboard",
                    "url": "/d/wa-session-drilldown?${__url_time_range}&${cluster:queryparam}&${job:queryparam}"
                    "&var-organization_id=${__data.fields.organization_id}"
                    "&var-organization_phone_id=${__value.raw}",
                }
            ],
        }
    ],
}


def _common_variables() -> list[Json]:
    return [
        _variable("cluster", "Cluster", "label_values(whatsapp_sidecar_build_info, cluster)"),
        _variable("job", "Job", 'label_values(whatsapp_sidecar_build_info{cluster=~"$cluster"}, job)'),
        _variable(
            "instance",
            "Instance",
            'label_values(whatsapp_sidecar_build_info{cluster=~"$cluster", job=~"$job"}, instance)',
        ),
        _variable(
            "organization_id", "Organization", f"label_values(whatsapp_decrypt_errors_total{{{JOB}}}, organization_id)"
        ),
        _variable("team", "Team", f"label_values(whatsapp_organization_team_info{{{JOB}}}, team)"),
    ]


def _by_team(series: str) -> str:
    """Joins an organization-level series with the owning team, so fleet panels follow $team too."""
    return (
        f"({series}) * on (job, instance, organization_id) group_left (team) "
        f'whatsapp_organization_team_info{{{JOB}, team=~"$team"}}'
    )


def fleet_overview() -> Json:
    closes = f"increase(whatsapp_session_closes_total{{{ORGANIZATION}}}[1d])"
    panels: list[Panel | Row] = [
        Row("Sessions"),
        Panel(
            "Tracked sessions by state",
            "short",
            (query(f"sum by (state) (whatsapp_sidecar_sessions{{{JOB}}})", "{{state}}"),),
            width=8,
        ),
        Panel(
            "Connected and unhealthy sessions",
            "short",
            (
                # the fleet family: complete under every --session-metrics mode (idle sessions have no series)
                query(f"sum({_by_team(f'whatsapp_sidecar_connected_sessions{{{ORGANIZATION}}}')})", "connected"),
                query(f"count(whatsapp_session_healthy{{{SESSION}}} == 0) or vector(0)", "unhealthy"),
            ),
            width=8,
        ),
        Panel(
            "QR re-scans needed per day",
            "short",
            (query(f"sum by (team) ({_by_team(closes)})", "{{team}}"),),
            width=8,
            description="Every close logs the phone out; each one needs a QR re-scan by the customer.",
        ),
        Panel(
            "Unhealthy sessions",
            "short",
            (
                query(
                    "max by (organization_id, organization_phone_id, team) "
                    f"(whatsapp_session_bad_mac_errors{{{SESSION}}})"
                    " and on (organization_id, organization_phone_id, team) "
                    f"(whatsapp_session_healthy{{{SESSION}}} == 0)",
                    instant=True,
                ),
            ),
            kind="table",
            width=24,
            description="Sessions one error short of a limit (value: current Bad MAC counter); no phone numbers. "
            "A phone id opens its session dashboard.",
            overrides=(SESSION_LINK,),
        ),
        Row("Errors, heals and closes"),
        Panel(
            "Decrypt errors by class",
            "ops",
            (query(f"sum by (kind) (rate(whatsapp_decrypt_errors_total{{{ORGANIZATION}}}{RATE}))", "{{kind}}"),),
        ),
        Panel(
            "Closes by reason",
            "short",
            (
                query(
                    f"sum by (reason) (increase(whatsapp_session_closes_total{{{ORGANIZATION}}}{RATE}))", "{{reason}}"
                ),
            ),
        ),
        Panel(
            "Heals and coalesced heals",
            "ops",
            (
                query(f"sum by (kind) (rate(whatsapp_session_heals_total{{{JOB}}}{RATE}))", "heal {{kind}}"),
                query(
                    f"sum by (kind) (rate(whatsapp_session_heals_coalesced_total{{{JOB}}}{RATE}))", "coalesced {{kind}}"
                ),
            ),
        ),
        Panel(
            "Auth keys deleted by scope",
            "short",
            (query(f"sum by (scope) (increase(whatsapp_auth_keys_deleted_total{{{JOB}}}{RATE}))", "{{scope}}"),),
        ),
        Row("Owner notifications"),
        Panel(
            "Owner notifications by outcome",
            "ops",
            (
                query(
                    f'sum by (team, outcome) (rate(whatsapp_owner_notifications_total{{{JOB}, team=~"$team"}}{RATE}))',
                    "{{team}} {{outcome}}",
                ),
            ),
            width=8,
        ),
        Panel(
            "Owner notification latency p99",
            "s",
            (
                query(
                    "histogram_quantile(0.99, sum by (le) "
                    f"(rate(whatsapp_owner_notification_latency_seconds_bucket{{{JOB}}}{RATE})))",
                    "p99",
                ),
            ),
            width=8,
        ),
        Panel(
            "Owner outbox depth", "short", (query(f"sum(whatsapp_owner_outbox_depth{{{JOB}}})", "waiting"),), width=8
        ),
        Row("The sidecar"),
        Panel(
            "Sidecar health",
            "short",
            (
                query(f"up{{{JOB}}}", "up {{instance}}"),
                query(f"whatsapp_sidecar_runtime_connections{{{JOB}}}", "runtime connections {{instance}}"),
                query(f"whatsapp_sidecar_pending_database_steps{{{JOB}}}", "pending database steps {{instance}}"),
            ),
            width=8,
        ),
        Panel(
            "Events received and rejected",
            "ops",
            (
                query(
                    f"sum by (type, channel) (rate(whatsapp_sidecar_events_total{{{JOB}}}{RATE}))",
                    "{{type}} {{channel}}",
                ),
                query(
                    f"sum by (reason) (rate(whatsapp_sidecar_events_rejected_total{{{JOB}}}{RATE}))",
                    "rejected {{reason}}",
                ),
            ),
            width=8,
        ),
        Panel(
            "Close duration p50 / p99",
            "s",
            (
                query(
                    "histogram_quantile(0.5, sum by (le) "
                    f"(rate(whatsapp_session_close_duration_seconds_bucket{{{JOB}}}{RATE})))",
                    "p50",
                ),
                query(
                    "histogram_quantile(0.99, sum by (le) "
                    f"(rate(whatsapp_session_close_duration_seconds_bucket{{{JOB}}}{RATE})))",
                    "p99",
                ),
            ),
            width=8,
        ),
    ]
    panels += [
        Row("Safety and liveness"),
        Panel(
            "Circuit breaker and held sessions",
            "short",
            (
                query(f"max(whatsapp_sidecar_breaker_tripped{{{JOB}}})", "breaker tripped"),
                query(f"sum(whatsapp_sidecar_held_sessions{{{JOB}}})", "held sessions"),
                query(f'max(whatsapp_sidecar_mode{{{JOB}, mode="observe"}})', "observe mode"),
            ),
            description="While tripped, sessions at a limit are held instead of logged out until an operator decides.",
        ),
        Panel(
            "Safety incidents by kind",
            "short",
            (
                query(
                    f"sum by (kind) (increase(whatsapp_session_incidents_total{{{ORGANIZATION}}}{RATE}))",
                    "{{kind}}",
                ),
            ),
            description="Logouts that did not stick, reconnect loops, shared credentials, deaf sessions.",
        ),
        Panel(
            "Deaf sessions and restarts",
            "short",
            (
                query(f"sum(whatsapp_sidecar_deaf_sessions{{{JOB}}})", "deaf now"),
                query(
                    f'sum(increase(whatsapp_session_incidents_total{{{ORGANIZATION}, kind="deaf"}}{RATE}))',
                    "found deaf",
                ),
                query(f"max(whatsapp_sidecar_restart_breaker_tripped{{{JOB}}})", "restarts held"),
            ),
            description="Connected sessions that receive nothing (probed, then deaf); restarts pass their own breaker.",
        ),
        Panel(
            "App-state sync failures by kind",
            "short",
            (
                query(
                    f"sum by (kind) (increase(whatsapp_app_state_sync_failures_total{{{JOB}}}{RATE}))",
                    "{{kind}}",
                ),
            ),
            description="Baileys' app-state signals: patch_mac and lthash_patch count toward the bad decrypt limit.",
        ),
        Row("Message loss"),
        Panel(
            "Messages undecryptable, recovered and lost",
            "short",
            (
                query(f"sum(increase(whatsapp_messages_undecryptable_total{{{ORGANIZATION}}}{RATE}))", "undecryptable"),
                query(
                    f"sum by (via) (increase(whatsapp_messages_recovered_total{{{ORGANIZATION}}}{RATE}))",
                    "recovered ({{via}})",
                ),
                query(f"sum(increase(whatsapp_messages_lost_total{{{ORGANIZATION}}}{RATE}))", "lost"),
            ),
            width=24,
            description="Failed messages (decrypt.error with a messageId), those the runtime's retries or the phone's "
            "placeholder resend recovered, and those lost: not recovered within --loss-deadline "
            "(WhatsAppSessionsLosingMessages). A loss is counted a deadline after its failure.",
        ),
        Row("Restrictions and runtime versions"),
        Panel(
            "Restricted numbers by kind",
            "short",
            (
                query(
                    "count by (kind) (max by (organization_id, organization_phone_id, kind) "
                    f"(whatsapp_session_restricted{{{SESSION}}}) == 1)",
                    "{{kind}}",
                ),
            ),
            width=8,
            description="Numbers WhatsApp restricts now (time lock, message cap, refused messages, bans), each "
            "counted once across replicas. Restrictions never log a number out. GET /v1/restrictions lists them.",
        ),
        Panel(
            "Restrictions started by kind",
            "short",
            (
                query(
                    f"sum by (kind) (increase(whatsapp_session_restrictions_total{{{ORGANIZATION}}}{RATE}))",
                    "{{kind}}",
                ),
            ),
            width=8,
            description="A wave (many numbers within minutes) is WhatsApp-side: WhatsAppSessionsRestrictionWave.",
        ),
        Panel(
            "Sessions by runtime version",
            "short",
            (
                query(f"sum by (library, version) (whatsapp_runtime_sessions{{{JOB}}})", "{{library}} {{version}}"),
                query(
                    f"sum by (advisory) (whatsapp_runtime_advisory_sessions{{{JOB}}})", "on an advisory: {{advisory}}"
                ),
            ),
            width=8,
            description="From each runtime's runtime.info; versions a known advisory names are counted apart "
            "(sidecar/rules/advisories.json).",
        ),
    ]
    return _dashboard(
        "wa-fleet-overview",
        "WhatsApp fleet",
        "Session health of a WhatsApp fleet as the session sidecar sees it: errors, heals, closes, notifications.",
        _common_variables(),
        panels,
    )


def session_drilldown() -> Json:
    phone = f'{JOB}, organization_phone_id=~"$organization_phone_id"'
    limit_line = (
        {
            "matcher": {"id": "byRegexp", "options": "limit.*"},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
        },
    )
    variables = [
        *_common_variables(),
        _variable(
            "organization_phone_id",
            "Organization phone",
            f"label_values(whatsapp_session_bad_mac_errors{{{SESSION}}}, organization_phone_id)",
            multi=False,
        ),
    ]
    panels: list[Panel | Row] = [
        Row("This session"),
        Panel(
            "Bad MAC errors against the limit",
            "short",
            (
                query(
                    f"max by (organization_phone_id) (whatsapp_session_bad_mac_errors{{{phone}}})",
                    "bad MAC {{organization_phone_id}}",
                ),
                query(f'max(whatsapp_session_error_limit{{{JOB}, kind="bad_mac"}})', "limit"),
            ),
            overrides=limit_line,
        ),
        Panel(
            "Bad decrypt errors against the limit",
            "short",
            (
                query(
                    f"max by (organization_phone_id) (whatsapp_session_bad_decrypt_errors{{{phone}}})",
                    "bad decrypt {{organization_phone_id}}",
                ),
                query(f'max(whatsapp_session_error_limit{{{JOB}, kind="bad_decrypt"}})', "limit"),
            ),
            overrides=limit_line,
        ),
        Panel(
            "Healthy and connected",
            "bool",
            (
                query(f"min(whatsapp_session_healthy{{{phone}}})", "healthy"),
                query(f"max(whatsapp_session_connected{{{phone}}})", "connected"),
            ),
            width=8,
            description=(
                "Under --session-metrics active (the default) a healthy idle session has no series of its own: no "
                "data here means it had nothing to say within the window (--session-metrics-window). Its live "
                "state is at GET /v1/sessions/{organizationPhoneId} on the sidecar (docs/operations/telemetry.md)."
            ),
        ),
        Panel(
            "Last decryption error",
            "dateTimeAsIso",
            (query(f"max(whatsapp_session_last_error_timestamp_seconds{{{phone}}}) * 1000", "last error"),),
            kind="stat",
            width=8,
        ),
        Panel(
            "Silence: time since the last inbound stanza",
            "s",
            (
                query(
                    f"time() - max(whatsapp_session_last_inbound_timestamp_seconds{{{phone}}})",
                    "silent for",
                ),
            ),
            description="What the deaf-session watch compares with the session's own usual gaps.",
            width=12,
        ),
        Panel(
            "Restrictions in force",
            "short",
            (query(f"max by (kind) (whatsapp_session_restricted{{{phone}}})", "{{kind}}"),),
            width=12,
            description="1 while WhatsApp restricts this number, by kind; the timeline (since, until, WhatsApp's "
            "code and text) is at GET /v1/sessions/{organizationPhoneId}.",
        ),
        Row("Its organization"),
        Panel(
            "Organization closes by reason",
            "short",
            (
                query(
                    f"sum by (reason) (increase(whatsapp_session_closes_total{{{ORGANIZATION}}}{RATE}))", "{{reason}}"
                ),
            ),
            width=8,
        ),
        Panel(
            "Organization decrypt errors by class",
            "ops",
            (query(f"sum by (kind) (rate(whatsapp_decrypt_errors_total{{{ORGANIZATION}}}{RATE}))", "{{kind}}"),),
            width=24,
        ),
    ]
    return _dashboard(
        "wa-session-drilldown",
        "WhatsApp session",
        "One organization phone: its counters against the limits, health, errors and closes. "
        "A closed session's series end at the close.",
        variables,
        panels,
    )


DASHBOARDS = {"whatsapp-fleet-overview.json": fleet_overview, "whatsapp-session-drilldown.json": session_drilldown}


def rendered() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the committed JSON is not what the code builds")
    args = parser.parse_args(argv)
    stale = [
        name for name, text in rendered().items() if not (HERE / name).exists() or (HERE / name).read_text() != text
    ]
    if args.check:
        for name in stale:
            print(
                f"dashboards/{name} differs from what dashboards/generate.py builds; run python -m dashboards.generate"
            )
        return 1 if stale else 0
    for name, text in rendered().items():
        (HERE / name).write_text(text)
    print(f"wrote {len(DASHBOARDS)} dashboards ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
