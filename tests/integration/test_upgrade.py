"""A rolling upgrade as the chart runs it: the new release's `migrate` first, then the previous release and the new
one serving side by side on one database. The previous release is the real code of an earlier commit (exported
with `git archive`), started as its own `serve` process; outcomes are read with SQL on a direct connection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from sidecar.client import connection_update, decrypt_error
from sidecar.store.migrations import MIGRATIONS
from tests.integration.test_fleet import closures_of
from tests.replicas import Replica, settled
from tests.seed import add_phone
from tests.waiting import eventually

# The release before this round's changes (its schema knows 5 migrations; this one adds an expand step).
PREVIOUS_RELEASE = "71ac2fa17f960023ba7ba2d7910ce0cb5154db66"
REPOSITORY = Path(__file__).resolve().parents[2]


def export_previous(target: Path) -> Path:
    known = subprocess.run(
        ["git", "-C", str(REPOSITORY), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], capture_output=True
    )
    if known.returncode != 0:
        pytest.skip(f"the previous release {PREVIOUS_RELEASE[:7]} is not in this checkout's history (a shallow clone)")
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", PREVIOUS_RELEASE, "sidecar"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


async def test_the_previous_release_decides_beside_the_new_one_after_the_new_migration(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    previous = export_previous(tmp_path / "previous")
    migrated = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "migrate", "--database-url", database,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await migrated.communicate()
    assert migrated.returncode == 0, output
    assert await db.fetchval("SELECT max(version) FROM wa_sidecar.schema_migrations") == len(MIGRATIONS)
    old = Replica("previous", database, tmp_path, code=previous)
    new = Replica("new", database, tmp_path)
    phones = [await add_phone(db, 1, f"7900222{index:04d}") for index in range(20)]
    await old.start()
    await new.start()
    fleet = [old, new]
    try:
        status, ready = await old.request("GET", "/readyz")
        assert status == 200 and ready["ready"] is True, ready  # the previous release serves on the new schema
        assert "undecidedEvents" not in ready  # and it is the previous release's code that answers
        for phone in phones:
            await old.events([connection_update(1, phone.organization_phone_id, phone.phone_jid, "open")])
        # Even phones reach the Bad MAC limit (3), odd ones stay below it (2); the errors alternate releases.
        for round_ in range(3):
            for index, phone in enumerate(phones):
                if round_ < 2 or index % 2 == 0:
                    error = decrypt_error(1, phone.organization_phone_id, phone.phone_jid, "Bad MAC")
                    await fleet[(index + round_) % 2].events([error])

        async def at_limit_closed() -> bool:
            closed = [len(await closures_of(db, p.organization_phone_id)) for p in phones[::2]]
            return all(count == 1 for count in closed)

        await eventually(at_limit_closed, what="every phone at the limit closed")
        await eventually(lambda: settled(fleet), what="no close in flight")
        for index, phone in enumerate(phones):
            pid = phone.organization_phone_id
            row = await db.fetchrow(
                "SELECT phase, bad_mac_errors FROM wa_sidecar.session_counters WHERE organization_phone_id = $1", pid
            )
            assert row is not None
            if index % 2 == 0:
                assert row["phase"] == "closed" and len(await closures_of(db, pid)) == 1
            else:
                assert row["phase"] == "active" and row["bad_mac_errors"] == 2, (index, dict(row))
        for replica in fleet:
            assert "Traceback" not in replica.log(), replica.log()[-3000:]
            assert "could not be decided" not in replica.log()
    finally:
        for replica in fleet:
            await replica.stop()
