"""Debian's redis-server on a free loopback port with a folder of its own, stopped by PID; redis-cli reads it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.monitoring import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class RedisServer:
    """`persist`: an append-only file in its folder, so what it held survives a stop and a start."""

    def __init__(self, persist: bool = False) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self._persist = persist
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self._dir), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self._persist else ["--appendonly", "no"]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for _ in range(200):
            if self.cli("PING") == "PONG":
                return self
            time.sleep(0.025)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def cli(self, *command: str) -> str:
        """One command through Debian's redis-cli (the independent reader), its raw output."""
        done = subprocess.run(
            [REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), "--raw", *command],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip()

    def fields(self, key: str) -> set[str]:
        text = self.cli("HKEYS", key)
        return set(text.splitlines()) if text else set()
