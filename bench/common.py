"""Shared by the benchmarks: a throwaway database with the seed schema, and a `wa-sidecar serve` subprocess."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

ROOT = Path(__file__).parent.parent
SEED_SCHEMA = (ROOT / "tests" / "fixtures" / "seed-schema.sql").read_text()
ADMIN_DSN = os.environ.get("WA_SIDECAR_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
KEYS_PER_PHONE = (
    "creds",
    "app-state-sync-key-AAAAAFBQ",
    "app-state-sync-version-regular_high",
    "pre-key-1",
    "pre-key-2",
    "session-15550002222.0",
    "session-15550003333.0",
    "sender-key-120363000000000001@g.us--15550002222:0",
)


# A fleet-wide storm is exactly what the circuit breaker holds back; these benchmarks measure the close path.
NO_BREAKER = ("--breaker-max-closes", "1000000")


@asynccontextmanager
async def served_here(app: web.Application) -> AsyncIterator[int]:
    """The app served in this process on a free loopback port (yielded) until the block ends."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass(frozen=True)
class Phone:
    organization_id: int
    organization_phone_id: int
    jid: str


@asynccontextmanager
async def seeded_database(
    phones: int, keys_per_phone: tuple[str, ...] = KEYS_PER_PHONE
) -> AsyncIterator[tuple[str, list[Phone]]]:
    name = f"wa_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    db = await asyncpg.connect(dsn)
    try:
        await db.execute(SEED_SCHEMA)
        rows = [(1 + i % 20, f"7{i:011d}@s.whatsapp.net") for i in range(phones)]
        await db.copy_records_to_table("OrganizationPhone", records=rows, columns=["organizationId", "phoneJid"])
        stored = await db.fetch('SELECT id, "organizationId", "phoneJid" FROM "OrganizationPhone" ORDER BY id')
        keys = [
            (row["organizationId"], row["phoneJid"].split("@")[0], key, "eyJ4IjoxfQ==", "base64_json")
            for row in stored
            for key in keys_per_phone
        ]
        await db.copy_records_to_table("baileys_auth", records=keys)
        result = [Phone(row["organizationId"], row["id"], row["phoneJid"]) for row in stored]
    finally:
        await db.close()
    try:
        yield dsn, result
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@dataclass
class Sidecar:
    process: asyncio.subprocess.Process
    base: str

    @property
    def ws_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/v1/runtime"

    @property
    def pid(self) -> int:
        return self.process.pid


@asynccontextmanager
async def sidecar_process(dsn: str | None, *extra: str) -> AsyncIterator[Sidecar]:
    """`wa-sidecar migrate` then `wa-sidecar serve` on a free port; stopped with SIGTERM afterwards."""
    if dsn:
        migrate = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "migrate", "--database-url", dsn, stdout=asyncio.subprocess.DEVNULL
        )
        await migrate.wait()
    port = free_port()
    args = [sys.executable, "-m", "sidecar", "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "ERROR"]
    if dsn:
        args += ["--database-url", dsn]
    process = await asyncio.create_subprocess_exec(*args, *extra)
    sidecar = Sidecar(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(sidecar.base + "/readyz") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sidecar did not become ready")
            await asyncio.sleep(0.05)
    try:
        yield sidecar
    finally:
        process.terminate()
        await process.wait()


class RssSampler:
    """Samples a process's RSS every `interval` seconds; `peak` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            value = rss_mb(self.pid)
            self.samples.append(value)
            self.peak = max(self.peak, value)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
