"""Benchmarks run in a tiny smoke mode so they cannot rot (their figures are not asserted)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


async def test_scrape_benchmark_runs() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "bench/scrape.py",
        "--sizes",
        "50",
        "--runs",
        "1",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, errors.decode()[-3000:]
    header, row = output.decode().splitlines()[:2]
    assert header.split()[0] == "sessions" and row.split()[0] == "50"
