"""Debian's PgBouncer in front of the shared PostgreSQL, on a free loopback port, stopped by PID."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.monitoring import free_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    def __init__(self, pool_mode: str = "transaction", backend_port: int = 5432, pool_size: int = 4) -> None:
        self.port = free_port()
        # Its own folder, readable by postgres (pytest's tmp_path is root's alone); removed by `remove`.
        self._dir = Path(tempfile.mkdtemp(prefix=f"pgbouncer-{self.port}-"))
        self._dir.chmod(0o755)
        self._config = self._dir / "pgbouncer.ini"
        (self._dir / "users.txt").write_text('"postgres" ""\n')
        self._config.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={backend_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self._dir / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n"
            f"logfile = {self._dir / 'pgbouncer.log'}\npidfile = {self._dir / 'pgbouncer.pid'}\n"
        )
        os.chown(self._dir, *_postgres_ids())  # PgBouncer refuses to run as root: it runs as postgres
        for path in self._dir.iterdir():
            os.chown(path, *_postgres_ids())
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, database_dsn: str) -> str:
        """The DSN of `database_dsn`'s database through this PgBouncer."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/" + database_dsn.rsplit("/", 1)[1]

    async def start(self) -> None:
        self._process = await asyncio.to_thread(
            subprocess.Popen,
            [PGBOUNCER, "-u", "postgres", str(self._config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return
        raise RuntimeError(f"pgbouncer did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self._dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self._process.wait), 10)
            except TimeoutError:
                self._process.kill()
                self._process.wait()
        self._process = None

    async def remove(self) -> None:
        await self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def _postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid
