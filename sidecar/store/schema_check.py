"""Checks that the configured tables and columns exist, so a wrong mapping fails at check time, not mid-close,
and watches the sidecar schema's migration level while serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from sidecar.config import SchemaMapping
from sidecar.ports import StoreUnavailable
from sidecar.store.sqlnames import quote_identifier
from sidecar.store.statements import Connection

log = logging.getLogger("sidecar.store.schema")


def _split(table: str) -> tuple[str | None, str]:
    schema, _, name = table.rpartition(".")
    return (schema or None), name


STORES_PAGE = "docs/concepts/stores.md"


async def check_schema(connection: asyncpg.Connection, mapping: SchemaMapping, auth_table: bool = True) -> list[str]:
    """Problems found, each naming the setting; empty when everything the sidecar needs is there. `auth_table`:
    the keys are in the mapped table (--key-store postgresql)."""
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
        if setting == "auth_table" and not auth_table:
            continue
        schema, name = _split(table)
        rows = await connection.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1 "
            "AND table_schema = COALESCE($2, current_schema())",
            name,
            schema,
        )
        present = {row["column_name"] for row in rows}
        if not present:
            problem = f"schema.{setting}: table {table!r} does not exist (or has no columns visible)"
            if setting == "auth_table":
                problem += (
                    "; if the runtime keeps its keys elsewhere, say where with --key-store (redis://…, file:///…, "
                    f"runtime), or name your table and columns with --schema-override (see {STORES_PAGE})"
                )
            problems.append(problem)
            continue
        for column_setting, column in columns.items():
            if column not in present:
                problems.append(f"schema.{column_setting}: column {column!r} not found in table {table!r}")
    return problems


SCHEMA_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class SchemaLevel:
    """How far the sidecar schema is migrated, and the fewest migrations a release must know to serve on it."""

    version: int
    serves_from: int


def version_problem(level: SchemaLevel, latest: int, schema: str) -> str | None:
    """What is wrong with the sidecar schema's migration level for this release, if anything. A newer level is
    fine while every migration past this release's was an expand step (a rolling upgrade: the newer release
    migrated first); one that needs a newer release means this one may misread what that one wrote."""
    if level.version < latest:
        migrate = "run `wa-sidecar migrate`"
        return f"the {schema!r} schema is at version {level.version}, this sidecar needs {latest}: {migrate}"
    if level.serves_from > latest:
        return (
            f"the {schema!r} schema is at version {level.version} and needs a release that knows at least "
            f"{level.serves_from} migrations; this sidecar knows {latest}: a newer release migrated it; run that "
            "release (or a newer one) instead of this one"
        )
    return None


def newer_note(level: SchemaLevel, latest: int, schema: str) -> str | None:
    """Said once when this release serves on a schema a newer release migrated (additive changes only)."""
    if level.version > latest and level.serves_from <= latest:
        return (
            f"the {schema!r} schema is at version {level.version}, newer than this sidecar knows ({latest}); the "
            "changes since are additive, so this release serves on it (a rolling upgrade in progress?)"
        )
    return None


async def migrated_level(connection: asyncpg.Connection | Connection, schema: str) -> SchemaLevel:
    """The sidecar schema's migration level (version 0 before the first `wa-sidecar migrate`)."""
    table = f"{quote_identifier(schema)}.schema_migrations"
    if await connection.fetchval("SELECT to_regclass($1)", table) is None:
        return SchemaLevel(0, 0)
    has_column = await connection.fetchval(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'serves_from' "
        "AND NOT attisdropped",
        table,
    )
    needs = "COALESCE(serves_from, version)" if has_column else "version"
    row = await connection.fetchrow(f"SELECT max(version) AS version, max({needs}) AS serves_from FROM {table}")
    assert row is not None
    return SchemaLevel(int(row["version"] or 0), int(row["serves_from"] or 0))


class SchemaWatch:
    """Whether the sidecar schema is migrated, re-read every few seconds: a database that comes back (or a
    failover to one restored from an older backup) unmigrated is reported on `/readyz`, not only at start."""

    def __init__(self, version: Callable[[], Awaitable[SchemaLevel]], latest: int, schema: str) -> None:
        self._version = version
        self._latest = latest
        self._schema = schema
        self.problem: str | None = None
        self._note: str | None = None

    async def check(self) -> None:
        try:
            level = await self._version()
        except StoreUnavailable:
            return  # the outage itself is reported by whoever needed the database
        problem = version_problem(level, self._latest, self._schema)
        if problem != self.problem:
            if problem is not None:
                log.error("%s", problem)
            else:
                log.info("the %r schema is migrated (version %d)", self._schema, level.version)
        note = newer_note(level, self._latest, self._schema)
        if note is not None and note != self._note:
            log.warning("%s", note)
        self._note = note
        self.problem = problem

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(SCHEMA_POLL_SECONDS)
