"""The Helm chart, rendered and linted by the official Helm SDK (PyPI helm-python-sdk, no cluster) and every
manifest validated by kubernetes-validate --strict; Prometheus Operator objects checked for what it needs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.monitoring import PROMTOOL, ROOT, RULES, SCRAPE_JOB, run_tool

CHART = ROOT / "helm" / "whatsapp-session-sidecar"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES = "1.37.0"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    with helm.Chart.load(str(chart)) as loaded:
        manifests = loaded.render(values or {}, name="wa", namespace="messenger", is_install=True)
    return [
        document
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for document in yaml.safe_load_all(text)
        if document
    ]


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]


def containers(documents: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for document in documents:
        if document["kind"] in {"Deployment", "Job"}:
            yield from document["spec"]["template"]["spec"]["containers"]


def check_operator_objects(documents: list[dict[str, Any]]) -> None:
    """What Prometheus Operator needs to act on them (its CRDs are not in kubernetes-validate)."""
    services = of_kind(documents, "Service")
    for monitor in of_kind(documents, "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        selected = [s for s in services if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert len(selected) == 1, "the ServiceMonitor selects exactly the chart's Service"
        service = selected[0]
        port_names = {port["name"] for port in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["interval"])
        assert service["metadata"]["labels"][spec["jobLabel"]] == SCRAPE_JOB, "job label the rules expect"
        assert spec["namespaceSelector"]["matchNames"] == ["messenger"]
        for label in spec.get("targetLabels", []):
            assert label in service["metadata"]["labels"], f"targetLabel {label} is not on the Service"
    for rule in of_kind(documents, "PrometheusRule"):
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        for group in rule["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for item in group["rules"]:
                assert isinstance(item["expr"], str) and ("alert" in item) != ("record" in item)


async def test_chart_files_are_in_sync_with_alerts_and_dashboards() -> None:
    code, output = await run_tool(sys.executable, str(ROOT / "helm" / "sync_chart_files.py"), "--check")
    assert code == 0, output


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda path: path.name)
def test_every_ci_values_file_lints_strictly_and_renders_valid_manifests(values_file: Path) -> None:
    values = yaml.safe_load(values_file.read_text()) or {}
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES}", namespace="messenger")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]
    documents = render(values)
    assert documents
    for document in documents:
        if document["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
    check_operator_objects(documents)


def test_strict_validation_can_fail() -> None:
    deployment = of_kind(render(), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_secure_defaults_and_probes() -> None:
    documents = render()
    deployment = of_kind(documents, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "resources" not in container, "resources are unset by default"
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = {item["name"]: item for item in container["env"]}
    assert env["WA_SIDECAR_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "wa-whatsapp-session-sidecar"
    assert "WA_SIDECAR_DATABASE_URL" not in env, "no database: the embedded store"
    assert of_kind(documents, "ServiceAccount")[0]["automountServiceAccountToken"] is False
    secret = of_kind(documents, "Secret")[0]
    assert len(secret["data"]["api-token"]) > 40, "tokens are generated when none are given"
    for optional in ("ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "Job"):
        assert not of_kind(documents, optional), f"{optional} is off by default"


def test_the_default_image_is_what_the_dockerfile_builds() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    assert f"docker build -t whatsapp-session-sidecar:{version} ." in dockerfile
    image = of_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"whatsapp-session-sidecar:{version}"
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert bases and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases[0]), "the base is pinned to a release"
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) >= 2, "multi-stage"
    user = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert user == [(str(values["podSecurityContext"]["runAsUser"]), str(values["podSecurityContext"]["runAsGroup"]))]


def test_prometheus_rule_holds_exactly_the_rules_of_alerts(tmp_path: Path) -> None:
    rule = of_kind(render({"prometheusRule": {"enabled": True}}), "PrometheusRule")[0]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


async def test_the_runbook_base_is_rewritten_and_the_rules_stay_valid(tmp_path: Path) -> None:
    base = "https://wiki.example.org/wa/runbook"
    rule = of_kind(render({"prometheusRule": {"enabled": True, "runbookBaseUrl": base}}), "PrometheusRule")[0]
    alerts = [item for group in rule["spec"]["groups"] for item in group["rules"] if "alert" in item]
    assert alerts and all(item["annotations"]["runbook_url"].startswith(base + "#") for item in alerts)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    code, output = await run_tool(PROMTOOL, "check", "rules", str(tmp_path / "rules.yml"))
    assert code == 0, output


def test_dashboards_config_map_holds_exactly_the_dashboards() -> None:
    config_map = of_kind(render({"dashboards": {"enabled": True}}), "ConfigMap")[0]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = {path.name: path.read_text() for path in (ROOT / "dashboards").glob("*.json")}
    assert shipped and set(config_map["data"]) == set(shipped)
    for name, text in shipped.items():
        assert config_map["data"][name] == text.rstrip("\n")
        assert json.loads(config_map["data"][name]) == json.loads(text)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "2"}, "at '/replicaCount': got string, want integer"),
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"limits": {"maxBadMacErrors": 0}}, "at '/limits/maxBadMacErrors'"),
        ({"auth": {"existingSecret": "Tokens_Secret"}}, "at '/auth/existingSecret'"),
        ({"database": {"secretKey": ""}}, "at '/database/secretKey'"),
        (
            {"extraEnv": [{"name": "X", "valueFrom": {"secretKeyRef": {"key": "x"}}}]},
            "at '/extraEnv/0/valueFrom/secretKeyRef': missing property 'name'",
        ),
        ({"serviceMonitor": {"enabled": "yes"}}, "at '/serviceMonitor/enabled': got string, want boolean"),
        ({"fleet": {"coordination": "shared"}}, "at '/fleet/coordination'"),
        ({"sessionMetrics": {"mode": "some"}}, "at '/sessionMetrics/mode'"),
    ],
)
def test_bad_values_are_rejected_with_the_path_named(values: dict[str, Any], message: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as raised:
            chart.validate_schema(chart.merge_values(values))
        assert message in str(raised.value), str(raised.value)
        with pytest.raises(helm.HelmError):
            chart.render(values, name="wa", namespace="messenger")


def test_several_replicas_without_a_database_are_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="replicaCount > 1 needs a database"):
        render({"replicaCount": 2})


def test_several_replicas_deciding_alone_are_refused_and_fleet_settings_reach_the_container() -> None:
    database = {"database": {"existingSecret": "wa-sidecar-database"}}
    with pytest.raises(helm.HelmRenderError, match=r"needs fleet\.coordination fleet"):
        render({**database, "replicaCount": 3, "fleet": {"coordination": "local"}})
    deployment = of_kind(render({**database, "replicaCount": 3, "fleet": {"closeLeaseSeconds": 30}}), "Deployment")[0]
    env = {item["name"]: item.get("value") for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert deployment["spec"]["replicas"] == 3
    assert env["WA_SIDECAR_COORDINATION"] == "fleet" and env["WA_SIDECAR_CLOSE_LEASE_SECONDS"] == "30"


def test_sidecar_mode_snippet_adds_the_container_to_a_runtime_pod(tmp_path: Path) -> None:
    """The chart README's snippet, verbatim, in a runtime chart that depends on this chart."""
    readme = (CHART / "README.md").read_text()
    snippet = re.search(r"<!-- sidecar-snippet -->\n```yaml\n(.*?)```", readme, re.DOTALL)
    assert snippet, "the README holds the sidecar snippet"
    runtime = tmp_path / "messenger-runtime"
    (runtime / "templates").mkdir(parents=True)
    shutil.copytree(CHART, runtime / "charts" / "whatsapp-session-sidecar")
    (runtime / "Chart.yaml").write_text(
        "apiVersion: v2\nname: messenger-runtime\nversion: 1.0.0\ndependencies:\n"
        "  - name: whatsapp-session-sidecar\n    version: 0.1.0\n"
    )
    (runtime / "values.yaml").write_text(
        "whatsapp-session-sidecar:\n  mode: sidecar\n  database:\n    existingSecret: messenger-database\n"
        "  sidecarMode:\n    podSelector: {app.kubernetes.io/name: messenger-runtime}\n"
    )
    head, body = snippet.group(1).split("\n", 1)
    (runtime / "templates" / "deployment.yaml").write_text(
        f"{head}\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: messenger-runtime\nspec:\n"
        "  selector:\n    matchLabels: {app.kubernetes.io/name: messenger-runtime}\n  template:\n"
        "    metadata:\n      labels: {app.kubernetes.io/name: messenger-runtime}\n" + body
    )
    documents = render(chart=runtime)
    for document in documents:
        if document["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
    deployments = of_kind(documents, "Deployment")
    assert [d["metadata"]["name"] for d in deployments] == ["messenger-runtime"], "no Deployment of its own"
    pod = deployments[0]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["runtime", "whatsapp-session-sidecar"]
    runtime_env = {e["name"]: e for e in pod["containers"][0]["env"]}
    token_secret = runtime_env["WA_SIDECAR_RUNTIME_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    secrets = {s["metadata"]["name"] for s in of_kind(documents, "Secret")}
    assert token_secret in secrets, "the runtime reads the token the subchart's Secret holds"
    sidecar_env = {e["name"]: e for e in pod["containers"][1]["env"]}
    assert sidecar_env["WA_SIDECAR_RUNTIME_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == token_secret
    assert sidecar_env["WA_SIDECAR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "messenger-database"
    mounted = {m["name"] for m in pod["containers"][1]["volumeMounts"]}
    assert mounted <= {v["name"] for v in pod["volumes"]}
    service = of_kind(documents, "Service")[0]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "messenger-runtime"}
    assert of_kind(documents, "Job"), "the migrate Job comes with the subchart"


def test_an_upgrade_migrates_first_then_rolls_as_the_upgrades_page_says() -> None:
    documents = render({"database": {"url": "postgresql://db/wa"}})
    [job] = of_kind(documents, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade" and annotations["helm.sh/hook-weight"] == "0"
    [secret] = [d for d in of_kind(documents, "Secret") if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0  # the Secret the Job reads exists first
    [deployment] = of_kind(documents, "Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    page = (ROOT / "docs" / "operations" / "upgrades.md").read_text()
    for said in ("`pre-upgrade` hook Job (weight 0", "Secret at weight -5", "(`RollingUpdate`)"):
        assert said in page, said


def test_the_migrate_jobs_pod_is_in_no_selector_of_the_serving_pods() -> None:
    values = {"podDisruptionBudget": {"enabled": True}, "networkPolicy": {"enabled": True}}
    documents = render({"database": {"url": "postgresql://db/wa"}, **values})
    [job] = of_kind(documents, "Job")
    labels = job["spec"]["template"]["metadata"]["labels"]
    selectors = [service["spec"]["selector"] for service in of_kind(documents, "Service")]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in of_kind(documents, "Deployment")]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in of_kind(documents, "PodDisruptionBudget")]
    selectors += [d["spec"]["podSelector"]["matchLabels"] for d in of_kind(documents, "NetworkPolicy")]
    assert len(selectors) == 4  # the Service, the Deployment, the PodDisruptionBudget, the NetworkPolicy
    for selector in selectors:
        assert not all(labels.get(key) == value for key, value in selector.items()), (selector, labels)
    [deployment] = of_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in selectors:  # and the serving pods still are
        assert all(pod.get(key) == value for key, value in selector.items()), selector


def test_the_key_store_value_or_secret_and_the_backends_auth_volume_reach_the_container() -> None:
    values = yaml.safe_load((CHART / "ci" / "keystore-values.yaml").read_text())
    [deployment] = of_kind(render(values), "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["WA_SIDECAR_KEY_STORE"]["value"] == "file:///var/lib/backend-auth/{organizationPhoneId}"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["wa-sidecar-auth-keys"] == "/var/lib/backend-auth"
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["wa-sidecar-auth-keys"]["persistentVolumeClaim"] == {"claimName": "backend-auth"}
    secret = {"keyStore": {"existingSecret": "redis-keys", "secretKey": "url"}}
    [deployment] = of_kind(render(secret), "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [item] = [item for item in container["env"] if item["name"] == "WA_SIDECAR_KEY_STORE"]
    assert item["valueFrom"]["secretKeyRef"] == {"name": "redis-keys", "key": "url"}
    [default] = of_kind(render(), "Deployment")
    names = {item["name"] for item in default["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "WA_SIDECAR_KEY_STORE" not in names, "the default leaves the keys in the database's table"


def test_the_session_metrics_mode_reaches_the_container() -> None:
    for values, expected in (
        ({}, ("active", "1h")),
        ({"sessionMetrics": {"mode": "none", "window": "30m"}}, ("none", "30m")),
    ):
        deployment = of_kind(render(values), "Deployment")[0]
        env = {
            item["name"]: item.get("value") for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert (env["WA_SIDECAR_SESSION_METRICS"], env["WA_SIDECAR_SESSION_METRICS_WINDOW"]) == expected


def test_the_readme_creates_every_object_its_example_names() -> None:
    """The production example names Secrets and a ConfigMap the chart does not create: the page creates each."""
    readme = (CHART / "README.md").read_text()
    example = yaml.safe_load(readme.split("# values-production.yaml\n", 1)[1].split("```", 1)[0])
    named = {example["database"]["existingSecret"], example["auth"]["existingSecret"],
             example["owners"]["existingConfigMap"], example["owners"]["secretsSecret"]}  # fmt: skip
    created = set(re.findall(r"kubectl -n messenger create (?:secret generic|configmap) ([\w-]+)", readme))
    assert len(named) == 4 and named <= created, named - created
    documents = render(example)  # the example renders with the chart as it is
    assert of_kind(documents, "ServiceMonitor")[0]["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_release_command_packages_a_chart_the_sdk_loads(tmp_path: Path) -> None:
    """`python -m build_release --no-image`: the chart linted and packaged; the archive (read by tarfile and by the
    Helm SDK) is the chart at its version, with its synced files, and renders."""
    result = subprocess.run(
        [sys.executable, "-m", "build_release", "--no-image", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    archive = tmp_path / f"whatsapp-session-sidecar-{chart['version']}.tgz"
    assert str(archive) in result.stdout
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    prefix = "whatsapp-session-sidecar/"
    assert {prefix + "Chart.yaml", prefix + "values.schema.json", prefix + "files/whatsapp-session.rules.yml",
            prefix + "templates/servicemonitor.yaml"} <= names  # fmt: skip
    with helm.Chart.load_archive(archive.read_bytes()) as loaded:
        assert (loaded.name, loaded.version) == (chart["name"], chart["version"])
        manifests = loaded.render({}, name="wa", namespace="messenger", is_install=True)
    assert any(path.endswith("deployment.yaml") for path in manifests)
