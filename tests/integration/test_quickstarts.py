"""The quickstarts' commands, taken from the pages as written and run as a new user would (the stock tools check
what they produce): a page whose commands stop working fails here."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.monitoring import AMTOOL, PROMTOOL

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "docs" / "quickstart"


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.DOTALL)


def test_the_log_quickstart_sample_runs_as_the_page_says() -> None:
    page = QUICKSTART / "logs.md"
    (command,) = [block.strip() for block in blocks(page, "sh") if "sample-backend.log" in block]
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/wa-sidecar"
    # As written, but from this interpreter, on a free port (the page's default port may be taken here).
    argv = [sys.executable, "-m", "sidecar", *argv[1:], "--listen", "127.0.0.1:0"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])["ingest"]
    (shown,) = [json.loads(block)["ingest"] for block in blocks(page, "json")]
    timing = ("seconds", "linesPerSecond")
    assert {k: v for k, v in summary.items() if k not in timing} == {k: v for k, v in shown.items() if k not in timing}
    actions = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    closed = [a for a in actions if a.get("msg") == "session closed"]
    healed = [a for a in actions if a.get("msg") == "session healed"]
    assert [(a["organizationPhoneId"], a["reason"]) for a in closed] == [(101, "bad_mac_limit")]
    assert 102 in {a["organizationPhoneId"] for a in healed}
    assert "15550001111" not in result.stderr and "15550004444" not in result.stderr


def test_the_baileys_quickstart_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    """The page's scrape config, pointed at this checkout, checked by Prometheus' own promtool (rules included);
    its job name is the one the rules and dashboards select on."""
    page = QUICKSTART / "baileys.md"
    (config,) = [block for block in blocks(page, "yaml") if "scrape_configs" in block]
    text = config.replace("/path/to/whatsapp-session-sidecar", str(ROOT))
    (tmp_path / "prometheus.yml").write_text(text)
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr and "rules found" in result.stdout + result.stderr
    job = re.search(r"job_name: (\S+)", text)
    rules = (ROOT / "alerts" / "whatsapp-session.rules.yml").read_text()
    assert job is not None and f'job="{job.group(1)}"' in rules


def test_the_alertmanager_example_the_quickstart_starts_from_passes_amtool() -> None:
    page = (QUICKSTART / "baileys.md").read_text()
    assert "alerts/alertmanager.example.yml" in page
    result = subprocess.run(
        [AMTOOL, "check-config", str(ROOT / "alerts" / "alertmanager.example.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_file_the_quickstarts_name_exists() -> None:
    """Paths in the repository the pages tell a new user to open, import or run."""
    named = set()
    for page in QUICKSTART.glob("*.md"):
        named |= set(re.findall(r"`((?:alerts|dashboards|integrations|helm|docs)/[\w./-]+)`", page.read_text()))
    assert len(named) >= 5
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert missing == []


def test_the_kubernetes_quickstart_values_render_what_the_page_promises() -> None:
    """The page's values file, rendered by the official Helm SDK and validated strictly: three replicas in fleet
    mode, the secrets it created, and the names its kubectl commands use."""
    import kubernetes_validate
    import yaml

    from tests.integration.test_helm import KUBERNETES, OPERATOR_KINDS, check_operator_objects, of_kind, render

    page = QUICKSTART / "kubernetes.md"
    (values_text,) = [block for block in blocks(page, "yaml") if block.startswith("# values-service.yaml")]
    documents = render(yaml.safe_load(values_text))
    for document in documents:
        if document["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
    check_operator_objects(documents)
    (deployment,) = of_kind(documents, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    commands = "".join(blocks(page, "sh"))
    assert f"deployment/{deployment['metadata']['name']}" in commands
    (service,) = of_kind(documents, "Service")
    assert f"service/{service['metadata']['name']}" in commands
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    references = [item["valueFrom"]["secretKeyRef"] for item in env if "secretKeyRef" in item.get("valueFrom", {})]
    secrets = {reference["name"] for reference in references}
    assert {"wa-sidecar-database", "wa-sidecar-tokens"} <= secrets
    assert all(f"secret generic {name}" in commands for name in ("wa-sidecar-database", "wa-sidecar-tokens"))


def test_the_adapter_installs_into_a_backend_as_the_baileys_quickstart_says(tmp_path: Path) -> None:
    """Step 2 as written, in an empty backend that has Baileys' `ws` (its one peer): the packed adapter installs and
    loads with the functions the page calls."""
    page = QUICKSTART / "baileys.md"
    (block,) = [block for block in blocks(page, "sh") if "npm pack" in block]
    backend = tmp_path / "backend"
    backend.mkdir()
    (backend / "package.json").write_text('{"name": "backend", "version": "1.0.0", "private": true}')
    ws = ROOT / "integrations" / "baileys" / "node_modules" / "ws"
    if not ws.is_dir():
        run_npm(["ci", "--no-audit", "--no-fund"], ROOT / "integrations" / "baileys")
    run_npm(["install", "--no-audit", "--no-fund", "--offline", str(ws)], backend)  # the backend's ws, as Baileys'
    for line in block.strip().splitlines():
        argv = shlex.split(line.split("#")[0].replace("/path/to/whatsapp-session-sidecar", str(ROOT)))
        assert argv[0] == "npm"
        run_npm([*argv[1:], "--no-audit", "--no-fund", "--offline"], backend)
    script = "const a = require('@whatsapp-session-sidecar/baileys'); console.log(Object.keys(a).sort().join(','))"
    loaded = subprocess.run(["node", "-e", script], cwd=backend, capture_output=True, text=True, check=False)
    assert loaded.returncode == 0, loaded.stderr
    exported = set(loaded.stdout.strip().split(","))
    called = set(re.findall(r"\b(attachSidecar|sidecarLogger)\(", page.read_text()))
    assert called and called <= exported
    assert not (backend / "node_modules" / "@whatsapp-session-sidecar" / "baileys").is_symlink()


def run_npm(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(["npm", *argv], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"npm {' '.join(argv)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
