"""Dashboards: committed JSON equals the generator's output, house rules hold, and Grafana's own TypeScript
dashboard types (npm @grafana/schema, checked by tsc) accept them. Live queries: test_monitoring_e2e.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from dashboards.generate import DASHBOARDS, HERE, main, rendered
from tests.monitoring import run_tool

TYPECHECK = HERE / "typecheck"
TSC = TYPECHECK / "node_modules" / "typescript" / "bin" / "tsc"


def committed() -> dict[str, dict[str, Any]]:
    return {name: json.loads((HERE / name).read_text()) for name in DASHBOARDS}


def test_committed_json_is_what_the_generator_builds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"]) == 0, capsys.readouterr().out
    assert {name: (HERE / name).read_text() for name in DASHBOARDS} == rendered()


def test_house_rules() -> None:
    uids = set()
    for name, dashboard in committed().items():
        uids.add(dashboard["uid"])
        variables = {variable["name"] for variable in dashboard["templating"]["list"]}
        assert {"datasource", "job", "organization_id", "team"} <= variables, name
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
        assert len(rows) >= 2 and dashboard["panels"][0]["type"] == "row", f"{name}: panels grouped in rows"
        assert {"cluster", "instance"} <= variables, name
        assert [link["tags"] for link in dashboard["links"]] == [["whatsapp-session-sidecar"]], name
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            where = f"{name} / {panel['title']}"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            assert panel["datasource"]["uid"] == "${datasource}", where
            for target in panel["targets"]:
                expr = target["expr"]
                assert 'job=~"$job", instance=~"$instance", cluster=~"$cluster"' in expr, f"{where}: not filtered"
                for window in re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr):
                    assert window in {"$__rate_interval", "1d"}, f"{where}: window {window}"
                assert "phone_jid" not in expr and "phoneJid" not in expr
    assert uids == {"wa-fleet-overview", "wa-session-drilldown"}, "uids are stable: alerts link to them"


def test_the_unhealthy_table_links_each_phone_to_its_session_dashboard() -> None:
    dashboards = {dashboard["uid"]: dashboard for dashboard in committed().values()}
    (table,) = [p for p in dashboards["wa-fleet-overview"]["panels"] if p["title"] == "Unhealthy sessions"]
    (override,) = table["fieldConfig"]["overrides"]
    assert override["matcher"] == {"id": "byName", "options": "organization_phone_id"}
    (link,) = override["properties"][0]["value"]
    target = link["url"].split("?")[0]
    assert target == "/d/wa-session-drilldown"
    drilldown_variables = {v["name"] for v in dashboards["wa-session-drilldown"]["templating"]["list"]}
    for variable in re.findall(r"var-(\w+)=", link["url"]):
        assert variable in drilldown_variables, variable


async def _tsc(tmp_path: Path, dashboards: dict[str, dict[str, Any]]) -> tuple[int, str]:
    if not TSC.exists():
        code, output = await run_tool("npm", "ci", "--no-audit", "--no-fund", cwd=TYPECHECK, deadline=300)
        assert code == 0, output
    (tmp_path / "node_modules").symlink_to(TYPECHECK / "node_modules")
    files = []
    for name, dashboard in dashboards.items():
        path = tmp_path / name.replace(".json", ".ts")
        # A literal (not an imported .json) so TypeScript checks literal unions and rejects unknown properties.
        path.write_text(
            "import type { Dashboard } from '@grafana/schema';\n"
            f"const dashboard: Dashboard = {json.dumps(dashboard, indent=2)};\nexport default dashboard;\n"
        )
        files.append(str(path))
    options = ["--noEmit", "--strict", "--skipLibCheck", "--module", "esnext", "--moduleResolution", "bundler"]
    return await run_tool("node", str(TSC), *options, "--target", "es2022", *files, cwd=tmp_path, deadline=300)


async def test_dashboards_type_check_against_grafana_schema(tmp_path: Path) -> None:
    code, output = await _tsc(tmp_path, committed())
    assert code == 0, output


async def test_the_type_check_rejects_a_malformed_dashboard(tmp_path: Path) -> None:
    broken = committed()
    fleet = broken["whatsapp-fleet-overview.json"]
    fleet["panels"][0]["gridPos"]["w"] = "wide"
    fleet["panels"][1]["unknownOption"] = True
    code, output = await _tsc(tmp_path, broken)
    assert code != 0
    assert '"unknownOption"\' does not exist' in output, output
    assert "Type 'string' is not assignable to type 'number'" in output, output
