"""A throwaway PostgreSQL cluster the tests start, stop and start again (for outage tests)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    return Path(candidates[0])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ThrowawayPostgres:
    """initdb into a temporary directory; PostgreSQL refuses to run as root, so root runs it as `postgres`."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="wa-sidecar-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self._bin = _bindir()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            os.chmod(self.directory, 0o755)
            shutil.chown(self.directory, "postgres", "postgres")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self, extra: str = "") -> None:
        """`extra`: more server options (`-c shared_preload_libraries=pg_stat_statements`)."""
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off {extra}".strip()
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.directory / "log"), "-w", "start")

    def stop(self) -> None:
        """An abrupt stop, as a crash or a failover looks to clients."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
