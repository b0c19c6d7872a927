"""Shared fixtures: a fresh PostgreSQL database per test with the seed backend's schema and our migrations."""

from __future__ import annotations

import json
import logging
import os
import re
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


# The numbers the tests' phones and peers use (seed.py, the Baileys samples): none may reach a log line. Not
# inside a word: a closure id's random hex digits can spell one (closureId "e922649dcc4549f7a79009522576bf39").
PHONE_NUMBER = re.compile(r"(?<![0-9A-Za-z])(?:7900\d{7}|1555000\d{4}|2055500\d{8})(?![0-9A-Za-z])")


def phone_numbers_in(text: str) -> list[str]:
    return PHONE_NUMBER.findall(text)


@pytest.fixture(autouse=True)
def no_phone_numbers_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every log line the suite produces at info level or above is scanned for phone numbers."""
    caplog.set_level(logging.INFO, logger="sidecar")
    yield
    for record in caplog.get_records("setup") + caplog.get_records("call"):
        if record.levelno >= logging.INFO and record.name.startswith("sidecar"):
            text = record.getMessage() + " " + json.dumps(record.__dict__.get("fields", {}), default=str)
            assert not phone_numbers_in(text), f"a phone number in a log line: {text[:300]}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its tier, so `-m unit` / `-m integration` select them wherever they are named."""
    for item in items:
        item.add_marker("unit" if "unit" in item.path.parts[-2:-1] else "integration")
