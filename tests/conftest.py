"""Shared fixtures: a fresh PostgreSQL database per test with the seed backend's schema and our migrations."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from sidecar.config import SchemaMapping
from sidecar.store.migrations import migrate
from tests.pgcluster import ThrowawayPostgres

FIXTURES = Path(__file__).parent / "fixtures"
SEED_SCHEMA = (FIXTURES / "seed-schema.sql").read_text()
ADMIN_DSN = os.environ.get("WA_SIDECAR_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def dsn_for(database: str, base: str = ADMIN_DSN) -> str:
    return base.rsplit("/", 1)[0] + "/" + database


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A new database with the seed schema and the sidecar's tables; dropped afterwards. Yields its DSN."""
    name = f"wa_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = dsn_for(name)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(SEED_SCHEMA)
        await migrate(connection, SchemaMapping().sidecar_schema)
    finally:
        await connection.close()
    yield dsn
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database)
    yield connection
    await connection.close()


@pytest.fixture
def cluster() -> Iterator[ThrowawayPostgres]:
    pg = ThrowawayPostgres()
    pg.init()
    pg.start()
    yield pg
    pg.destroy()


@pytest.fixture
async def seeded(cluster: ThrowawayPostgres) -> AsyncIterator[str]:
    connection = await asyncpg.connect(cluster.dsn)
    await connection.execute(SEED_SCHEMA)
    await migrate(connection, "wa_sidecar")
    await connection.close()
    yield cluster.dsn
