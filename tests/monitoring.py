"""Real Prometheus and Alertmanager (Debian packages) on loopback, for the tests and the notify benchmark.

Each server gets a free port and its own temporary data directory, is awaited by polling its readiness
endpoint with a deadline, and is stopped by PID (terminate, then kill) when the context ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).parent.parent
RULES = ROOT / "alerts" / "whatsapp-session.rules.yml"
ALERTMANAGER_EXAMPLE = ROOT / "alerts" / "alertmanager.example.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager") or "alertmanager"
PROMTOOL = shutil.which("promtool") or "promtool"
AMTOOL = shutil.which("amtool") or "amtool"
SCRAPE_JOB = "whatsapp-session-sidecar"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_ready(url: str, process: asyncio.subprocess.Process, deadline_seconds: float = 60) -> None:
    deadline = time.monotonic() + deadline_seconds
    async with aiohttp.ClientSession() as http:
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"{url}: the server exited with {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} was not ready within {deadline_seconds}s")
            await asyncio.sleep(0.1)


async def run_tool(
    *argv: str,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    deadline: float = 120,
) -> tuple[int, str]:
    """A CLI tool (promtool, amtool, npm, node) as an asyncio subprocess: exit code and combined output."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        env=env,
        start_new_session=True,  # its own process group: a timeout kills the tool and whatever it started
    )
    async with killed_on_exit(process):
        output, _ = await asyncio.wait_for(process.communicate(stdin), deadline)
    return int(process.returncode or 0), output.decode()


@asynccontextmanager
async def killed_on_exit(process: asyncio.subprocess.Process) -> AsyncIterator[None]:
    """If the block fails (a timeout), the process's whole group is killed: nothing outlives the test."""
    try:
        yield
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


@asynccontextmanager
async def _server(argv: Sequence[str], ready_url: str, work: Path) -> AsyncIterator[None]:
    log = (work / "server.log").open("wb")
    process = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        try:
            await wait_ready(ready_url, process)
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{(work / 'server.log').read_text()[-3000:]}") from None
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


@dataclass(frozen=True)
class Alertmanager:
    base: str

    async def alerts(self, **filters: str) -> list[dict[str, Any]]:
        params = {key: value for key, value in filters.items()}
        async with aiohttp.ClientSession() as http, http.get(self.base + "/api/v2/alerts", params=params) as response:
            response.raise_for_status()
            result: list[dict[str, Any]] = await response.json()
            return result

    async def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        async with aiohttp.ClientSession() as http, http.post(self.base + "/api/v2/alerts", json=alerts) as response:
            response.raise_for_status()


@asynccontextmanager
async def alertmanager(config: str) -> AsyncIterator[Alertmanager]:
    work = Path(tempfile.mkdtemp(prefix="wa-alertmanager-"))
    port = free_port()
    (work / "alertmanager.yml").write_text(config)
    argv = [
        ALERTMANAGER,
        f"--config.file={work / 'alertmanager.yml'}",
        f"--storage.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        async with _server(argv, base + "/-/ready", work):
            yield Alertmanager(base)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class Prometheus:
    base: str

    async def api(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(f"{self.base}/api/v1/{path}", params=params) as response:
            body = await response.json()
            if body.get("status") != "success":
                raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def firing(self) -> set[str]:
        data = await self.api("alerts")
        return {alert["labels"]["alertname"] for alert in data["alerts"] if alert["state"] == "firing"}


@asynccontextmanager
async def prometheus(
    targets: Sequence[str], alertmanager_base: str | None = None, rules: Path = RULES, interval: str = "1s"
) -> AsyncIterator[Prometheus]:
    """Scrapes the targets as job whatsapp-session-sidecar, evaluates the rules, sends alerts on."""
    work = Path(tempfile.mkdtemp(prefix="wa-prometheus-"))
    port = free_port()
    alerting = ""
    if alertmanager_base:
        alerting = (
            "alerting:\n  alertmanagers:\n    - static_configs:\n"
            f"        - targets: ['{alertmanager_base.removeprefix('http://')}']\n"
        )
    (work / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
        f"rule_files: ['{rules}']\n{alerting}"
        f"scrape_configs:\n  - job_name: {SCRAPE_JOB}\n    static_configs:\n"
        f"      - targets: [{', '.join(repr(t) for t in targets)}]\n"
    )
    argv = [
        PROMETHEUS,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        async with _server(argv, base + "/-/ready", work):
            yield Prometheus(base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
