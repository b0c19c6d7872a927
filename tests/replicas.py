"""Real `wa-sidecar serve` processes for fleet-mode tests: start, SIGKILL, restart, talk HTTP to them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import phone_numbers_in
from tests.monitoring import free_port, wait_ready

API_TOKEN = "fleet-operator-token"


class Replica:
    def __init__(
        self,
        name: str,
        database: str,
        work: Path,
        extra: Sequence[str] = (),
        code: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """`code`: the directory holding another release's `sidecar` package (run instead of this checkout's);
        `env`: more environment (libfaketime's LD_PRELOAD and FAKETIME: a replica whose clock is off; set on the
        process itself, not through a wrapper that a SIGTERM would stop without its child)."""
        self.name = name
        self._code = code
        self._env = env or {}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._argv = [
            sys.executable, "-m", "sidecar", "serve", "--listen", f"127.0.0.1:{self.port}",
            "--database-url", database, "--instance", name, *extra,
        ]  # fmt: skip
        self._log_path = work / f"{name}.log"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, ready: bool = True) -> None:
        env = {**os.environ, "WA_SIDECAR_API_TOKEN": API_TOKEN, **self._env}
        if self._code is not None:  # `-m` puts the working directory first: start where only that code is
            env["PYTHONPATH"] = str(self._code)
        with self._log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self._argv, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=self._code
            )
        if ready:
            try:
                await wait_ready(self.base + "/readyz", self._process)
            except RuntimeError as error:
                raise RuntimeError(f"{error}\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, as a crashed pod."""
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)

    def pause(self, paused: bool = True) -> None:
        """SIGSTOP (a replica stuck: a long GC pause, a frozen VM) and SIGCONT."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    async def stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            if process is not None:
                await process.wait()
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def wait_exited(self) -> None:
        assert self._process is not None
        await self._process.wait()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        async with (
            aiohttp.ClientSession(self.base) as http,
            http.request(method, path, json=body, headers=headers) as response,
        ):
            return response.status, await response.json()

    async def events(self, events: list[dict[str, Any]]) -> None:
        status, body = await self.request("POST", "/v1/events", events)
        assert status == 202, (status, body)

    async def pending_steps(self) -> int:
        status, body = await self.request("GET", "/readyz")
        assert status == 200, body
        return int(body["pendingSteps"])


@asynccontextmanager
async def replicas(count: int, database: str, work: Path, extra: Sequence[str] = ()) -> AsyncIterator[list[Replica]]:
    fleet = [Replica(f"replica-{chr(ord('a') + index)}", database, work, extra) for index in range(count)]
    try:
        await asyncio.gather(*(replica.start() for replica in fleet))
        yield fleet
    finally:
        await asyncio.gather(*(replica.stop() for replica in fleet))
    for replica in fleet:  # the replicas' own log lines carry no phone number either
        assert not phone_numbers_in(replica.log()), f"{replica.name} logged a phone number"


async def settled(fleet: Sequence[Replica]) -> bool:
    """No replica has a close in flight or a database step waiting: the effects decided so far are done."""
    for replica in fleet:
        status, body = await replica.request("GET", "/v1/sessions?state=closing")
        if status != 200 or body["sessions"] or await replica.pending_steps():
            return False
    return True
