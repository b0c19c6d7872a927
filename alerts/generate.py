"""Builds the Prometheus rules from alerts/rules.source.yml; alerts/whatsapp-session.rules.yml is the committed output.

    python -m alerts.generate                    # rewrite alerts/whatsapp-session.rules.yml
    python -m alerts.generate --check            # exit 1 when the committed file differs (CI)
    python -m alerts.generate --job my-sidecar --cluster-label cluster \\
        --runbook-base https://wiki.example.org/wa/runbook --out my.rules.yml   # your own copy

What is set here, once: the scrape target's matchers put on every selector of every rule (`job`, and optionally
a cluster label, so one Prometheus or Thanos can hold several fleets), each alert's `for:` with the reason for it
(docs/reference/alerts.md shows them), and the runbook base URL each alert's runbook_url is under.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
SOURCE = HERE / "rules.source.yml"
OUTPUT = HERE / "whatsapp-session.rules.yml"
JOB = "whatsapp-session-sidecar"  # the chart's ServiceMonitor gives this job whatever nameOverride says
RUNBOOK_BASE = "https://runbooks.example.com/whatsapp-session-sidecar/runbook"  # the chart's runbookBaseUrl replaces it

# Each alert's `for:` and why. The per-session alerts the product asks for fire at once; what a single scrape can
# show by accident (a restart, a deploy, one slow write) waits long enough to be real.
FOR: dict[str, tuple[str, str]] = {
    "WhatsAppSessionBadMacErrors": ("0s", "the product's alert at 2 Bad MAC: at once; one more error logs it out"),
    "WhatsAppSessionBadDecryptErrors": ("0s", "one short of the limit: at once, the next error logs it out"),
    "WhatsAppSessionUnhealthy": ("2m", "an open after a flap clears the counters; still unhealthy 2 min later is real"),
    "WhatsAppSessionClosedByCryptoErrors": ("0s", "a logout has happened: the QR re-scan is needed now"),
    "WhatsAppSessionsLoggedOutSpike": ("0s", "the 5-minute increase already smooths it; an incident is now"),
    "WhatsAppSidecarDown": ("2m", "a rolling restart misses a scrape or two; 2 minutes is not a restart"),
    "WhatsAppSidecarRuntimeDisconnected": ("5m", "runtimes reconnect within seconds after a deploy of either side"),
    "WhatsAppOwnerWebhookFailing": ("0s", "dead letters are final; the retried share is already over 10 minutes"),
    "WhatsAppSidecarBreakerTripped": ("0s", "logouts are being held: an operator has to decide now"),
    "WhatsAppSessionReconnectedAfterLogout": ("0s", "a logout that did not stick: credentials in use elsewhere"),
    "WhatsAppSessionReconnectLoop": ("0s", "the 15-minute increase is the window; the incident is counted once"),
    "WhatsAppSidecarObserveModeLeftOn": ("24h", "observe mode is for a rollout of hours; a day means forgotten"),
    "WhatsAppSidecarTaskFailing": ("0s", "each failure is already a restart with backoff; repeated ones show"),
    "WhatsAppSidecarStepsDropped": ("0s", "a dropped step is data not written: at once"),
    "WhatsAppSidecarWritesLagging": ("5m", "a failover or restart of PostgreSQL takes a minute or two"),
    "WhatsAppSessionDeaf": ("10m", "the watch has confirmed it already; a restart (--deaf-action) gets 10 minutes"),
    "WhatsAppSidecarRestartsHeld": ("0s", "restarts are being held: an operator has to decide now"),
    "WhatsAppSessionRestricted": (
        "10m",
        "Baileys' default 60 s time lock passes; 10 minutes is a customer not reached",
    ),
    "WhatsAppSessionsRestrictionWave": ("0s", "the 10-minute increase is the window; a wave is an incident now"),
    "WhatsAppSessionsLosingMessages": ("0s", "the hour's increase is the window, and lost is 5 min after the failure"),
    "WhatsAppSessionsOnAdvisoryVersion": (
        "30m",
        "a rolling upgrade runs the old version for minutes, not half an hour",
    ),
}

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


@dataclass(frozen=True)
class Settings:
    job: str = JOB
    cluster_label: str | None = None  # a label naming the fleet's cluster; its value is matched by regex `.+`
    cluster: str = ".+"
    runbook_base: str = RUNBOOK_BASE

    @property
    def matchers(self) -> str:
        found = f'job="{self.job}"'
        if self.cluster_label:
            found += f', {self.cluster_label}=~"{self.cluster}"'
        return found


def with_matchers(expr: str, matchers: str) -> str:
    """`expr` with `matchers` on every selector: each `{...}`, and each sidecar metric (whatsapp_*, up) written
    without braces. Quoted strings are left alone."""
    out: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        char = expr[i]
        if char == '"':
            j = i + 1
            while expr[j] != '"':
                j += 2 if expr[j] == "\\" else 1
            out.append(expr[i : j + 1])
            i = j + 1
        elif char == "{":
            empty = expr[i + 1 :].lstrip().startswith("}")
            out.append("{" + matchers + ("" if empty else ", "))
            i += 1
        elif (match := _IDENT.match(expr, i)) and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
            name = match.group()
            out.append(name)
            i = match.end()
            if (name.startswith("whatsapp_") or name == "up") and not expr[i:].lstrip(" ").startswith("{"):
                out.append("{" + matchers + "}")
        else:
            out.append(char)
            i += 1
    return "".join(out)


def rules(settings: Settings) -> dict[str, Any]:
    document = yaml.safe_load(SOURCE.read_text())
    alerts = set()
    for group in document["groups"]:
        built = []
        for rule in group["rules"]:
            rule = {**rule, "expr": with_matchers(rule["expr"].strip(), settings.matchers)}
            if "alert" in rule:
                name = rule["alert"]
                alerts.add(name)
                duration, _ = FOR[name]
                ordered = {"alert": name, "expr": rule["expr"]}
                if duration != "0s":
                    ordered["for"] = duration
                annotations = dict(rule["annotations"])
                annotations["runbook_url"] = f"{settings.runbook_base}#{name.lower()}"
                rule = ordered | {"labels": rule["labels"], "annotations": _ordered(annotations)}
            built.append(rule)
        group["rules"] = built
    if alerts != set(FOR):
        raise SystemExit(f"alerts/generate.py FOR and the source disagree: {sorted(alerts ^ set(FOR))}")
    return dict(document)


def _ordered(annotations: dict[str, str]) -> dict[str, str]:
    order = ("summary", "description", "runbook_url", "dashboard_url")
    return {key: annotations[key] for key in order if key in annotations} | {
        key: value for key, value in annotations.items() if key not in order
    }


class _Dumper(yaml.SafeDumper):
    """Block style with indented lists, text with newlines as literal blocks, no line folding of PromQL."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def rendered(settings: Settings = Settings()) -> str:
    header = (
        "# Generated by `python -m alerts.generate` from alerts/rules.source.yml (expressions, annotations) and\n"
        "# alerts/generate.py (the scrape target's matchers, each `for:` and why, the runbook base URL); do not\n"
        f"# edit by hand. Scrape job: {settings.job}.\n"
    )
    body = yaml.dump(rules(settings), Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return header + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed rules; exit 1 on drift")
    parser.add_argument("--job", default=JOB, help=f"the scrape job's name ({JOB})")
    parser.add_argument("--cluster-label", help="also match this label (e.g. cluster), any value unless --cluster")
    parser.add_argument("--cluster", default=".+", help="the cluster label's value, a regex (.+)")
    parser.add_argument("--runbook-base", default=RUNBOOK_BASE, help="where the runbook is served")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_-]*|[^\"\\\\]+", args.job) or '"' in args.job:
        parser.error("--job: a job name without quotes or backslashes")
    if args.cluster_label is not None and not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", args.cluster_label):
        parser.error("--cluster-label: a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)")
    settings = Settings(args.job, args.cluster_label, args.cluster, args.runbook_base.rstrip("/"))
    text = rendered(settings)
    if args.check:
        if args.out.read_text() != text:
            print(f"{args.out} is out of date: run python -m alerts.generate")
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
