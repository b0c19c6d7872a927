"""Checks that the configured tables and columns exist, so a wrong mapping fails at check time, not mid-close."""

from __future__ import annotations

import asyncpg

from sidecar.config import SchemaMapping


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
