"""The shipped rules and Alertmanager example, checked by promtool and amtool and a live Alertmanager."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from alerts import generate
from tests.monitoring import (
    ALERTMANAGER_EXAMPLE,
    AMTOOL,
    PROMTOOL,
    ROOT,
    RULES,
    alertmanager,
    run_tool,
)
from tests.waiting import eventually

RULE_TESTS = sorted((ROOT / "alerts" / "tests").glob("*.yml"))
RUNBOOK = ROOT / "alerts" / "runbook.md"
RUNBOOK_BASE = "https://runbooks.example.com/whatsapp-session-sidecar/runbook#"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


async def test_promtool_checks_and_unit_tests_pass() -> None:
    code, output = await run_tool(PROMTOOL, "check", "rules", str(RULES))
    assert code == 0, output
    assert RULE_TESTS, "alerts/tests/*.yml holds the promtool unit tests"
    code, output = await run_tool(PROMTOOL, "test", "rules", *map(str, RULE_TESTS))
    assert code == 0, output


async def test_promtool_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The unit tests can fail: the Bad MAC rule moved from 2 to 3 errors breaks them."""
    rule = 'whatsapp_session_bad_mac_errors{job="whatsapp-session-sidecar"}'
    changed = RULES.read_text().replace(f"{rule} >= 2", f"{rule} >= 3")
    assert changed != RULES.read_text()
    (tmp_path / "whatsapp-session.rules.yml").write_text(changed)
    tests = tmp_path / "tests"
    tests.mkdir()
    for path in RULE_TESTS:
        (tests / path.name).write_text(path.read_text())
    code, output = await run_tool(PROMTOOL, "test", "rules", *(str(tests / p.name) for p in RULE_TESTS))
    assert code != 0
    assert "WhatsAppSessionBadMacErrors" in output


def test_every_alert_has_labels_annotations_a_unit_test_and_a_runbook_section() -> None:
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    runbook = RUNBOOK.read_text()
    anchors = {heading.strip().lower() for heading in re.findall(r"^## (\w+)\s*$", runbook, re.MULTILINE)}
    rules = alert_rules()
    required = {
        "WhatsAppSessionBadMacErrors",
        "WhatsAppSessionBadDecryptErrors",
        "WhatsAppSessionUnhealthy",
        "WhatsAppSessionClosedByCryptoErrors",
        "WhatsAppSessionsLoggedOutSpike",
        "WhatsAppSidecarDown",
        "WhatsAppSidecarRuntimeDisconnected",
        "WhatsAppOwnerWebhookFailing",
    }
    assert required <= {rule["alert"] for rule in rules}
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"WhatsApp(Session|Sidecar|Owner)\w+", name), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert "{{" not in annotations["summary"], f"{name}: summary is static"
        assert annotations["runbook_url"] == RUNBOOK_BASE + name.lower(), name
        assert annotations["dashboard_url"].startswith("/d/wa-"), name
        assert "phone_jid" not in annotations["description"] and "phoneJid" not in annotations["description"]
        assert name in tested, f"{name} has no promtool unit test"
        assert name.lower() in anchors, f"{name} has no section in alerts/runbook.md"


async def test_alertmanager_example_is_valid_and_routes_by_team() -> None:
    code, output = await run_tool(AMTOOL, "check-config", str(ALERTMANAGER_EXAMPLE))
    assert code == 0, output
    for labels, receiver in (
        (["team=sales", "alertname=WhatsAppSessionBadMacErrors", "organization_id=7"], "sales"),
        (["team=platform", "alertname=WhatsAppSessionBadMacErrors", "organization_id=1"], "platform"),
        (["team=unassigned", "alertname=WhatsAppSessionUnhealthy"], "platform"),
    ):
        code, output = await run_tool(
            AMTOOL, "config", "routes", "test", f"--config.file={ALERTMANAGER_EXAMPLE}", *labels
        )
        assert code == 0, output
        assert output.strip().splitlines()[-1] == receiver, (labels, output)


def _alert(name: str, organization_id: str, phone_id: str | None = None, team: str = "sales") -> dict[str, Any]:
    labels = {"alertname": name, "organization_id": organization_id, "team": team, "severity": "warning"}
    if phone_id:
        labels["organization_phone_id"] = phone_id
    return {"labels": labels, "annotations": {"summary": name}}


async def test_a_crypto_close_inhibits_the_bad_mac_warning_of_its_organization_in_a_live_alertmanager() -> None:
    async with alertmanager(ALERTMANAGER_EXAMPLE.read_text()) as manager:
        await manager.post_alerts(
            [_alert("WhatsAppSessionBadMacErrors", "7", "42"), _alert("WhatsAppSessionBadMacErrors", "8", "43")]
        )
        await manager.post_alerts([_alert("WhatsAppSessionClosedByCryptoErrors", "7")])

        async def inhibited() -> dict[str, list[str]]:
            return {
                alert["labels"]["organization_id"]: alert["status"]["inhibitedBy"]
                for alert in await manager.alerts()
                if alert["labels"]["alertname"] == "WhatsAppSessionBadMacErrors"
            }

        async def organization_7_muted() -> bool:
            return bool((await inhibited()).get("7"))

        await eventually(organization_7_muted, what="the close inhibits organization 7's Bad MAC warning")
        assert (await inhibited())["8"] == [], "another organization's warning stays active"


async def test_every_alert_reaches_the_route_meant_for_it() -> None:
    """amtool walks the example's routing tree with each shipped alert's labels (a per-team alert with a team of
    each receiver): an alert with a route of its own reaches that route, every other one its team's route."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())
    own_routes = {
        match.group(1): route
        for route in config["route"]["routes"]
        for matcher in route["matchers"]
        if (match := re.fullmatch(r'alertname="(\w+)"', matcher))
    }
    team_receivers = {"sales": "sales", "platform": "platform", "unassigned": "platform"}
    for rule in alert_rules():
        name, static = rule["alert"], rule["labels"]
        for team in [static["team"]] if "team" in static else list(team_receivers):
            labels = {**static, "alertname": name, "team": team, "organization_id": "7"}
            code, output = await run_tool(
                AMTOOL, "config", "routes", "test", f"--config.file={ALERTMANAGER_EXAMPLE}", "--tree",
                *(f"{key}={value}" for key, value in sorted(labels.items())),
            )  # fmt: skip
            assert code == 0, output
            matched = [line for line in output.splitlines() if "receiver:" in line]
            assert len(matched) == 1, (name, output)  # one route, no fall-through to another
            if name in own_routes:
                assert f'alertname="{name}"' in matched[0], (name, output)
                assert output.strip().splitlines()[-1] == own_routes[name]["receiver"]
            else:
                assert f'team="{team}"' in matched[0] or team == "unassigned", (name, output)
                assert output.strip().splitlines()[-1] == team_receivers[team], (name, team, output)


def test_the_committed_rules_are_what_the_generator_builds() -> None:
    assert generate.main(["--check"]) == 0
    assert RULES.read_text() == generate.rendered()


async def test_every_selector_names_the_scrape_target_and_another_job_and_cluster_can_be_chosen(
    tmp_path: Path,
) -> None:
    """The shipped rules select job="whatsapp-session-sidecar" everywhere (promtool reads them); generated for
    another job, a cluster label and another runbook, every selector carries both and promtool accepts them."""
    out = tmp_path / "mine.rules.yml"
    argv = ["--job", "fleet-a", "--cluster-label", "cluster", "--cluster", "eu-1",
            "--runbook-base", "https://wiki.example.org/wa/runbook/", "--out", str(out)]  # fmt: skip
    assert generate.main(argv) == 0
    code, output = await run_tool(PROMTOOL, "check", "rules", str(out))
    assert code == 0, output
    for path, matchers in ((RULES, 'job="whatsapp-session-sidecar"'), (out, 'job="fleet-a", cluster=~"eu-1"')):
        groups = yaml.safe_load(path.read_text())["groups"]
        for rule in (rule for group in groups for rule in group["rules"]):
            selectors = re.findall(r"\{[^{}]*\}", re.sub(r"\{\{.*?\}\}", "", rule["expr"]))
            assert selectors and all(s.startswith("{" + matchers) for s in selectors), (path.name, rule["expr"])
    alerts = [r for g in yaml.safe_load(out.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert all(a["annotations"]["runbook_url"].startswith("https://wiki.example.org/wa/runbook#") for a in alerts)
    assert {a["alert"]: a.get("for", "0s") for a in alerts} == {name: f for name, (f, _) in generate.FOR.items()}
