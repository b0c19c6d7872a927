"""Config validation, migrate, check-config and serve's startup refusals, through the real CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from sidecar.config import ConfigError, add_config_arguments, config_from_args
from sidecar.store.migrations import MIGRATIONS, migrate
from tests.replicas import Replica, replicas
from tests.waiting import eventually


def parse(*argv: str, env: dict[str, str] | None = None) -> object:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)), env or {})


def wa_sidecar(*argv: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    ("argv", "env", "key"),
    [
        (["--max-bad-mac-errors", "0"], {}, "max-bad-mac-errors"),
        (["--max-bad-decrypt-errors", "five"], {}, "max-bad-decrypt-errors"),
        ([], {"WA_SIDECAR_LISTEN": "9464"}, "listen"),
        (["--listen", "127.0.0.1:70000"], {}, "listen"),
        (["--database-url", "mysql://x"], {}, "database-url"),
        (["--schema-override", 'auth_table=baileys_auth"; DROP TABLE x; --'], {}, "schema.auth_table"),
        (["--schema-override", "phone_status_column=st atus"], {}, "schema.phone_status_column"),
        (["--schema-override", "no_such_key=x"], {}, "schema.no_such_key"),
        ([], {"WA_SIDECAR_SCHEMA_OVERRIDES": "auth_table=a.b.c"}, "schema.auth_table"),
        (["--critical-status-codes", "401,abc"], {}, "critical-status-codes"),
        (["--delete-prekeys-on-heal", "maybe"], {}, "delete-prekeys-on-heal"),
        (["--retention", "30x"], {}, "retention"),
        ([], {"WA_SIDECAR_STATE_TTL": "0"}, "state-ttl"),
        (["--state-ttl", "inf"], {}, "state-ttl"),
        (["--database-command-timeout", "-1"], {}, "database-command-timeout"),
    ],
)
def test_bad_settings_name_the_key(argv: list[str], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(*argv, env=env)
    assert error.value.key == key


def test_durations_read_with_their_units() -> None:
    config = parse("--retention", "30d", "--state-ttl", "90", env={"WA_SIDECAR_DATABASE_COMMAND_TIMEOUT": "2.5"})
    assert (config.retention, config.state_ttl, config.database_command_timeout) == (2_592_000.0, 90.0, 2.5)  # type: ignore[attr-defined]
    assert parse("--state-ttl", "15m").state_ttl == 900.0  # type: ignore[attr-defined]
    assert parse("--state-ttl", "12h").state_ttl == 43_200.0  # type: ignore[attr-defined]


def test_flags_win_over_environment() -> None:
    config = parse(
        "--max-bad-mac-errors", "4", env={"WA_SIDECAR_MAX_BAD_MAC_ERRORS": "7", "WA_SIDECAR_LISTEN": "0.0.0.0:1"}
    )
    assert config.policy.limits.max_bad_mac_errors == 4  # type: ignore[attr-defined]
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 1)  # type: ignore[attr-defined]


def test_cli_reports_a_bad_setting_and_exits_non_zero() -> None:
    result = wa_sidecar("check-config", "--schema-override", "phone_table=Organization Phone")
    assert result.returncode == 2
    assert "schema.phone_table" in result.stderr and "not a valid SQL identifier" in result.stderr


def test_serve_refuses_an_open_listener_without_tokens() -> None:
    result = wa_sidecar("serve", "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert "--insecure" in result.stderr


@pytest.mark.parametrize("variable", ["WA_SIDECAR_API_TOKEN", "WA_SIDECAR_RUNTIME_TOKEN"])
def test_a_short_or_spaced_token_is_refused_without_repeating_it(variable: str) -> None:
    for token, problem in (("s3cr3", "at least 16 characters, got 5"), ("a token with spaces", "without spaces")):
        result = wa_sidecar("serve", env={**os.environ, variable: token})
        assert result.returncode == 2, result.stderr
        assert f"{variable}: must be" in result.stderr and problem in result.stderr
        assert token not in result.stderr + result.stdout and "Traceback" not in result.stderr
    accepted = parse(env={variable: "x" * 16})
    assert getattr(accepted, variable.removeprefix("WA_SIDECAR_").lower()) == "x" * 16


async def test_migrate_is_idempotent_and_check_config_validates_the_tables(database: str) -> None:
    # The fixture already migrated; a second run applies nothing.
    connection = await asyncpg.connect(database)
    try:
        assert await migrate(connection, "wa_sidecar") == []
        assert await connection.fetchval("SELECT max(version) FROM wa_sidecar.schema_migrations") == len(MIGRATIONS)
    finally:
        await connection.close()
    result = wa_sidecar("migrate", "--database-url", database, "--schema-override", "sidecar_schema=other_sidecar")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"schema": "other_sidecar", "applied": list(range(1, len(MIGRATIONS) + 1))}

    ok = wa_sidecar("check-config", "--database-url", database)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["schema"] == "ok"
    bad = wa_sidecar("check-config", "--database-url", database, "--schema-override", "auth_table=baileys_auth2")
    assert bad.returncode == 2
    assert "schema.auth_table: table 'baileys_auth2' does not exist" in bad.stderr
    bad_column = wa_sidecar("check-config", "--database-url", database, "--schema-override", "phone_qr_column=qr")
    assert bad_column.returncode == 2 and "schema.phone_qr_column" in bad_column.stderr


def test_serve_refuses_an_unmigrated_database() -> None:
    result = wa_sidecar(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        "postgresql://postgres@127.0.0.1/test",
        "--schema-override",
        "sidecar_schema=never_migrated",
    )
    assert result.returncode == 2
    assert "wa-sidecar migrate" in result.stderr


def test_migrate_without_a_database_is_a_clear_error() -> None:
    result = wa_sidecar("migrate")
    assert result.returncode == 2 and "--database-url" in result.stderr
    result = wa_sidecar("migrate", "--database-url", "postgresql://postgres@127.0.0.1:1/test")
    assert result.returncode == 3 and "cannot connect" in result.stderr


async def test_serve_on_port_zero_reports_the_port_it_bound() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        while True:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, "serve exited before it reported its address"
            record = json.loads(line)
            if record["msg"] == "serving":
                break
        url = record["listen"]
        assert not url.endswith(":0")
        async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as response:
            assert response.status == 200
    finally:
        process.terminate()
        await process.wait()


async def test_a_newer_schema_is_served_while_its_changes_are_additive_and_refused_once_one_is_not(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A rolling upgrade's older replica against the newer release's migrations: an expand step (serves_from at
    most what this release knows) keeps it serving, with a note; a contract step stops it (exit 2, a message
    saying why), check-config says the same, and one already serving turns not ready."""
    latest = len(MIGRATIONS)
    insert = "INSERT INTO wa_sidecar.schema_migrations (version, serves_from) VALUES ($1, $2)"
    async with replicas(1, database, tmp_path) as (serving,):
        await db.execute(insert, latest + 1, latest)  # an expand step of a newer release
        await eventually(lambda: "changes since are additive" in serving.log(), what="the note", deadline_seconds=20)
        status, body = await serving.request("GET", "/readyz")
        assert status == 200, body
        checked = await asyncio.to_thread(wa_sidecar, "check-config", "--database-url", database)
        assert checked.returncode == 0 and "additive" in json.loads(checked.stdout)["schemaNote"], checked
        await db.execute(insert, latest + 2, latest + 2)  # a contract step: it needs that release
        await eventually(lambda: _not_usable(serving), deadline_seconds=20, what="the serving replica not ready")
    started = await asyncio.to_thread(wa_sidecar, "serve", "--listen", "127.0.0.1:0", "--database-url", database)
    refusal = f"needs a release that knows at least {latest + 2} migrations; this sidecar knows {latest}"
    assert started.returncode == 2 and refusal in started.stderr, started.stderr
    checked = await asyncio.to_thread(wa_sidecar, "check-config", "--database-url", database)
    assert checked.returncode == 2 and refusal in checked.stderr, checked.stderr


async def _not_usable(replica: Replica) -> bool:
    status, body = await replica.request("GET", "/readyz")
    return status == 503 and "needs a release that knows at least" in body["reason"]


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["serve", "--databse-url", "x"], "--databse-url: did you mean --database-url?"),
        (["serve", "--max-bad-mac", "0"], "--max-bad-mac: did you mean --max-bad-mac-errors?"),  # no abbreviations
        (["migrate", "--database-pooler=transaktion", "--zzz"], "--zzz: no such flag"),
        (["check-config", "--max-bad-decrypt=1"], "--max-bad-decrypt: did you mean --max-bad-decrypt-errors?"),
    ],
)
def test_an_unknown_flag_gets_the_commands_usage_and_the_nearest_flag(argv: list[str], suggestion: str) -> None:
    result = wa_sidecar(*argv)
    assert result.returncode == 2, result
    assert f"usage: wa-sidecar {argv[0]}" in result.stderr and suggestion in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_help_names_each_settings_environment_variable_and_the_tokens() -> None:
    result = wa_sidecar("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    settings = ("WA_SIDECAR_DATABASE_URL", "[env WA_SIDECAR_MAX_BAD_MAC_ERRORS]", "[env WA_SIDECAR_SCHEMA_OVERRIDES]")
    for expected in (*settings, "WA_SIDECAR_API_TOKEN:", "WA_SIDECAR_RUNTIME_TOKEN:"):
        assert expected in text, expected
    own = " ".join(wa_sidecar("ingest-logs", "--help").stdout.split())
    assert "--follow" in own and "[env WA_SIDECAR_FOLLOW]" not in own  # its own flags are no settings


def test_each_command_shows_its_own_flags_in_groups() -> None:
    migrate = wa_sidecar("migrate", "--help").stdout
    assert "--database-url" in migrate and "--database-pooler" in migrate and "--deaf-floor" not in migrate
    assert len(migrate.splitlines()) < 40, len(migrate.splitlines())  # it was 157
    serve = wa_sidecar("serve", "--help").stdout
    for title in ("listening and access:", "database:", "session rules:", "fleet and safety:",
                  "liveness (deaf sessions):", "owners, webhooks and the closure log:"):  # fmt: skip
        assert f"\n{title}\n" in serve, title
    refused = wa_sidecar("migrate", "--deaf-floor", "1m")
    assert refused.returncode == 2 and "usage: wa-sidecar migrate" in refused.stderr, refused.stderr


def test_an_owners_file_problem_is_one_line_naming_the_file_once(tmp_path: Path) -> None:
    broken = tmp_path / "owners.yaml"
    broken.write_text("teams:\n  - bad: [\n")
    cases = {
        broken: "not valid YAML: expected the node content, but found '<stream end>' at line 3, column 1",
        tmp_path / "missing.yaml": "cannot read it: No such file or directory",
    }
    for command in ("serve", "check-config"):
        for path, problem in cases.items():
            result = wa_sidecar(command, "--owners-file", str(path))
            assert result.returncode == 2, result.stderr
            assert result.stderr == f"wa-sidecar: owners file {path}: {problem}\n"
