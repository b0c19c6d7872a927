"""Copies the single sources of truth, alerts/ and dashboards/, into the chart's files/.

python helm/sync_chart_files.py          # copy
python helm/sync_chart_files.py --check  # exit 1 when the chart's copies drift (the tests run this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "helm" / "whatsapp-session-sidecar" / "files"


def sources() -> dict[Path, Path]:
    """Chart copy -> source."""
    copies = {FILES / "whatsapp-session.rules.yml": ROOT / "alerts" / "whatsapp-session.rules.yml"}
    for dashboard in sorted((ROOT / "dashboards").glob("*.json")):
        copies[FILES / "dashboards" / dashboard.name] = dashboard
    return copies


def drift() -> list[str]:
    wanted = sources()
    problems = [
        f"{copy.relative_to(ROOT)} differs from {source.relative_to(ROOT)}"
        for copy, source in wanted.items()
        if not copy.exists() or copy.read_bytes() != source.read_bytes()
    ]
    extra = [path for path in FILES.rglob("*") if path.is_file() and path not in wanted]
    problems += [f"{path.relative_to(ROOT)} has no source any more" for path in extra]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    problems = drift()
    if args.check:
        for problem in problems:
            print(f"{problem}; run python helm/sync_chart_files.py")
        return 1 if problems else 0
    for path in FILES.rglob("*"):
        if path.is_file() and path not in sources():
            path.unlink()
    for copy, source in sources().items():
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(source.read_bytes())
    print(f"synced {len(sources())} files into {FILES.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
