"""The docs site: its reference pages match the code that defines them, and MkDocs builds it with broken links as
errors (the stock builder, `mkdocs build --strict`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_references_match_the_code() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "docs.generate", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    built = {path.relative_to(tmp_path / "site").as_posix() for path in (tmp_path / "site").rglob("index.html")}
    for page in ("reference/metrics/index.html", "quickstart/baileys/index.html", "operations/runbook/index.html",
                 "reference/baileys-adapter/index.html"):  # fmt: skip
        assert page in built
    # Material for MkDocs: a search index of every page, highlighted code with a copy button, and the nav in the
    # sidebar rather than a top menu.
    site = tmp_path / "site"
    index = json.loads((site / "search" / "search_index.json").read_text())
    assert {doc["location"].split("#")[0] for doc in index["docs"]} >= {"reference/baileys-adapter/", "demo/"}
    quickstart = (site / "quickstart" / "baileys" / "index.html").read_text()
    assert 'class="highlight"' in quickstart and "md-content" in quickstart
    assert '"content.code.copy"' in quickstart and "md-tabs" not in quickstart


def test_every_metric_the_process_serves_is_in_the_reference() -> None:
    """Independent of the generator: names read from a live registry's exposition by the stock parser."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from sidecar.rules.policy import Limits
    from sidecar.telemetry.metrics import SidecarMetrics

    registry = CollectorRegistry()
    SidecarMetrics(registry, Limits())
    page = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name.endswith("_created"):
            continue  # the client's creation timestamps of labelless counters, not metrics of ours
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in page, name


def test_the_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```sh\n")[1:3]
    assert blocks[0].startswith("python3 -m venv .venv") and "wa-sidecar demo" in blocks[0]
    assert "pytest" in blocks[1]


def test_the_contributor_hooks_pass_on_the_tree() -> None:
    """CONTRIBUTING's pre-commit hooks, run by the stock tool on every tracked file, as a contributor's commit
    would run them: the tree passes what it asks contributors to pass."""
    hooks = [str(Path(sys.executable).parent / "pre-commit"), "run", "--all-files", "--show-diff-on-failure"]
    result = subprocess.run(hooks, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Passed" in result.stdout and "Failed" not in result.stdout


def test_every_environment_variable_the_code_reads_is_in_the_reference() -> None:
    """Independent of the generator's tables: the names the code spells out, found in its source text."""
    page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    source = "".join(path.read_text() for path in (ROOT / "sidecar").rglob("*.py"))
    spelled = set(re.findall(r'"((?:OTEL|WA_SIDECAR)_[A-Z_]+)"', source))
    spelled |= {"WA_SIDECAR_" + name for name in re.findall(r'ENV_PREFIX \+ "([A-Z_]+)"', source)}
    assert len(spelled) >= 6
    assert sorted(name for name in spelled if f"`{name}`" not in page) == []
