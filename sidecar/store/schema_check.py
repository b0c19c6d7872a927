"""Checks that the configured tables and columns exist, so a wrong mapping fails at check time, not mid-close,
and watches the sidecar schema's migration level while serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from sidecar.config import SchemaMapping
from sidecar.ports import StoreUnavailable
from sidecar.store.sqlnames import quote_identifier

log = logging.getLogger("sidecar.store.schema")


def _split(table: str) -> tuple[str | None, str]:
    schema, _, name = table.rpartition(".")
    return (schema or None), name


async def check_schema(connection: asyncpg.Connection, mapping: SchemaMapping) -> list[str]:
    """Problems found, each naming the setting; empty when everything the sidecar needs is there."""
    wanted = {
        ("auth_table", mapping.auth_table): {
            "auth_organization_column": mapping.auth_organization_column,
            "auth_phone_column": mapping.auth_phone_column,
            "auth_key_column": mapping.auth_key_column,
        },
        ("phone_table", mapping.phone_table): {
            "phone_id_column": mapping.phone_id_column,
            "phone_organization_column": mapping.phone_organization_column,
            "phone_jid_column": mapping.phone_jid_column,
            "phone_status_column": mapping.phone_status_column,
            "phone_qr_column": mapping.phone_qr_column,
            "phone_last_connected_column": mapping.phone_last_connected_column,
            **({"phone_updated_column": mapping.phone_updated_column} if mapping.phone_updated_column else {}),
        },
    }
    problems: list[str] = []
    for (setting, table), columns in wanted.items():
        schema, name = _split(table)
        rows = await connection.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1 "
            "AND table_schema = COALESCE($2, current_schema())",
            name,
            schema,
        )
        present = {row["column_name"] for row in rows}
        if not present:
            problems.append(f"schema.{setting}: table {table!r} does not exist (or has no columns visible)")
            continue
        for column_setting, column in columns.items():
            if column not in present:
                problems.append(f"schema.{column_setting}: column {column!r} not found in table {table!r}")
    return problems


SCHEMA_POLL_SECONDS = 5.0


def version_problem(version: int, latest: int, schema: str) -> str | None:
    """What is wrong with the sidecar schema's migration level for this release, if anything. A newer level
    means a newer release migrated the database: this one may misread what that one wrote, so it does not serve."""
    if version < latest:
        return f"the {schema!r} schema is at version {version}, this sidecar needs {latest}: run `wa-sidecar migrate`"
    if version > latest:
        return (
            f"the {schema!r} schema is at version {version}, newer than this sidecar knows ({latest}): a newer "
            "release migrated it; run that release (or a newer one) instead of this one"
        )
    return None


async def migrated_version(connection: asyncpg.Connection, schema: str) -> int:
    """The sidecar schema's migration level (0 before the first `wa-sidecar migrate`)."""
    table = f"{quote_identifier(schema)}.schema_migrations"
    if await connection.fetchval("SELECT to_regclass($1)", table) is None:
        return 0
    return int(await connection.fetchval(f"SELECT max(version) FROM {table}") or 0)


class SchemaWatch:
    """Whether the sidecar schema is migrated, re-read every few seconds: a database that comes back (or a
    failover to one restored from an older backup) unmigrated is reported on `/readyz`, not only at start."""

    def __init__(self, version: Callable[[], Awaitable[int]], latest: int, schema: str) -> None:
        self._version = version
        self._latest = latest
        self._schema = schema
        self.problem: str | None = None

    async def check(self) -> None:
        try:
            version = await self._version()
        except StoreUnavailable:
            return  # the outage itself is reported by whoever needed the database
        problem = version_problem(version, self._latest, self._schema)
        if problem != self.problem:
            if problem is not None:
                log.error("%s", problem)
            else:
                log.info("the %r schema is migrated (version %d)", self._schema, version)
        self.problem = problem

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(SCHEMA_POLL_SECONDS)
