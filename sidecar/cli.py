"""wa-sidecar: serve, migrate, check-config, ingest-logs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
from aiohttp import web

from sidecar import __version__
from sidecar.app import Extras, StartupError, create_app
from sidecar.components import COMPONENTS, Components
from sidecar.config import (
    ENV_PREFIX,
    ENVIRONMENT_ONLY,
    MIGRATE_FLAGS,
    Config,
    ConfigError,
    add_config_arguments,
    config_from_args,
    env_name,
)
from sidecar.ingest.baileys_log import BaileysLogReader
from sidecar.ingest.command import (
    IngestRun,
    LogOnlySockets,
    SessionMapError,
    announce,
    lines_of,
    load_session_map,
    pump,
    summary_line,
)
from sidecar.keystores.check import check_key_store, sample_phone
from sidecar.keystores.spec import KeyPlace
from sidecar.notify.owners import OwnersError, load_owners
from sidecar.ports import StoreUnavailable
from sidecar.sim.demo import DemoTally, add_demo_arguments, demo_config, fleet_config, run_demo
from sidecar.store.migrations import MIGRATIONS, migrate
from sidecar.store.postgres import connect_options
from sidecar.store.schema_check import check_schema, migrated_level, newer_note, version_problem
from sidecar.telemetry.logs import configure_logging

log = logging.getLogger("sidecar.cli")

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3

Work = Callable[[Components, str], Coroutine[Any, Any, None]]


class _HelpWithEnvironment(argparse.HelpFormatter):
    """Each setting's help names the environment variable it is also read from."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        env: str | None = getattr(action, "env", None)
        return f"{text} [env {env}]" if env and env not in text else text


class _Parser(argparse.ArgumentParser):
    """No abbreviations (`--max-bad-mac 0` is not `--max-bad-mac-errors 0`); an unknown flag is answered with the
    command's own usage and the nearest flag it has."""

    commands: dict[str, _Parser]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpWithEnvironment)
        super().__init__(*args, **kwargs)

    def unknown(self, extras: Sequence[str]) -> NoReturn:
        flags = [flag for action in self._actions for flag in action.option_strings]
        hints = []
        for word in extras:
            if word.startswith("-"):
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
                hints.append(f"{flag}: did you mean {close[0]}?" if close else f"{flag}: no such flag")
        self.error(f"unrecognized arguments: {' '.join(extras)}" + "".join(f"\n  {hint}" for hint in hints))


ENVIRONMENT_EPILOG = "environment only (never flags, so secrets stay out of process listings):\n" + "\n".join(
    f"  {ENV_PREFIX}{name}: {text}" for name, text in ENVIRONMENT_ONLY.items()
)


def build_parser() -> _Parser:
    parser = _Parser(prog="wa-sidecar", description="WhatsApp session health sidecar")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    parser.commands = {}
    for name, text in (
        ("serve", "run the sidecar: session runtime, HTTP API, health endpoints"),
        ("migrate", "create or upgrade the sidecar's own tables in PostgreSQL"),
        ("check-config", "validate the configuration (and, with a database URL, the configured tables)"),
        ("ingest-logs", "feed the runtime from a Baileys backend's log (pino JSON + libsignal output)"),
        ("demo", "the sidecar and a simulated fleet with real cryptography, in one process, with a live view"),
    ):
        command = commands.add_parser(
            name, help=text, description=text, epilog=ENVIRONMENT_EPILOG, formatter_class=_RawEpilog
        )
        assert isinstance(command, _Parser)
        parser.commands[name] = command
        add_config_arguments(command, MIGRATE_FLAGS if name == "migrate" else None)
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                action.env = env_name(action.option_strings[0])  # type: ignore[attr-defined]
        if name == "ingest-logs":
            command.add_argument("source", nargs="?", default="-", help="log file, or - for stdin (default)")
            command.add_argument("--follow", action="store_true", help="keep reading as the file grows or rotates")
            command.add_argument("--from-end", action="store_true", help="start at the end of the file")
            command.add_argument(
                "--sessions",
                type=Path,
                help="YAML/JSON mapping a binding's value to organizationId, "
                "organizationPhoneId and phoneJid (when the log lines carry no such bindings)",
            )
            command.add_argument(
                "--message-ids",
                action="store_true",
                help="the log is at debug level: send each failed message's id, and its recovery when Baileys "
                "later logs the receipt of the same id (at info level nothing shows a recovery: every failure "
                "would look lost, so loss is measured only with this)",
            )
        if name == "demo":
            add_demo_arguments(command)
    return parser


class _RawEpilog(_HelpWithEnvironment, argparse.RawDescriptionHelpFormatter):
    """The environment list keeps its lines."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands[args.command].unknown(extras)  # exits 2 with the command's usage
    try:
        config = config_from_args(args)
    except ConfigError as error:
        print(f"wa-sidecar: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "demo" and args.log_level is None and "WA_SIDECAR_LOG_LEVEL" not in os.environ:
        config = replace(config, log_level="ERROR")  # the live view is the demo's output
    configure_logging(config.log_level)
    if args.command == "serve":
        return _serve(config)
    if args.command == "ingest-logs":
        return _ingest_logs(config, args)
    if args.command == "demo":
        return _demo(config, args)
    if args.command == "migrate":
        return asyncio.run(_migrate(config))
    return asyncio.run(_check_config(config))


def _ingest_logs(config: Config, args: argparse.Namespace) -> int:
    try:
        session_map = load_session_map(args.sessions) if args.sessions is not None else None
        reader = BaileysLogReader(session_map, message_ids=args.message_ids)
    except SessionMapError as error:
        print(f"wa-sidecar: --sessions {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.source != "-" and not Path(args.source).is_file():
        print(f"wa-sidecar: {args.source}: no such log file", file=sys.stderr)
        return EXIT_CONFIG
    announce(args.source, args.follow)
    run = IngestRun(reader)

    async def work(components: Components, base: str) -> None:
        await pump(components, lines_of(args.source, args.follow, args.from_end), run)

    # A one-off read serves nothing unless asked (it would clash with a `serve` on the same port); following a
    # log keeps /metrics up for Prometheus.
    listen = args.follow or args.listen is not None or env_name("--listen") in os.environ
    try:
        return _serve(config, work, Extras(sockets=LogOnlySockets()), listen=listen)
    finally:
        print(summary_line(run.summary()), flush=True)  # also when SIGTERM or SIGINT stopped a follow


def _demo(config: Config, args: argparse.Namespace) -> int:
    config = demo_config(config)
    tally = DemoTally()
    fleet = fleet_config(args)

    async def work(components: Components, base: str) -> None:
        await run_demo(components, tally, base, fleet, args.duration)

    return _serve(config, work, Extras(observers=[tally]))


def _serve(config: Config, work: Work | None = None, extras: Extras | None = None, listen: bool = True) -> int:
    try:
        config.check_exposure()
    except ConfigError as error:
        print(f"wa-sidecar: refusing to start: {error}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        asyncio.run(_run_server(config, work, extras, listen))
    except StartupError as error:
        print(f"wa-sidecar: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as error:
        print(f"wa-sidecar: cannot listen on {config.listen_host}:{config.listen_port}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def _bound_url(config: Config, runner: web.AppRunner) -> str:
    """The address actually bound: with port 0 the system picks one, and callers need to know which."""
    port = runner.addresses[0][1] if runner.addresses else config.listen_port
    host = f"[{config.listen_host}]" if ":" in config.listen_host else config.listen_host
    return f"http://{host}:{port}"


async def _run_server(
    config: Config, work: Work | None = None, extras: Extras | None = None, listen: bool = True
) -> None:
    """Serves until SIGINT/SIGTERM, or until `work` (given the live components and the base URL) is done.
    Without `listen` the parts run with no HTTP listener (a one-off `ingest-logs`); the base URL is then empty."""
    # keepalive_timeout also bounds a new connection's wait for a complete request head: a client that trickles
    # its headers is disconnected after it (aiohttp measures it from the connection's start).
    runner = web.AppRunner(
        create_app(config, extras),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=config.request_header_timeout,
    )
    await runner.setup()
    try:
        if listen:
            await web.TCPSite(runner, config.listen_host, config.listen_port).start()
        base = _bound_url(config, runner) if listen else ""
        log.info(
            "serving" if listen else "running without a listener (pass --listen to serve /metrics)",
            extra={
                "fields": {
                    "listen": base or None,
                    "store": "postgresql" if config.database_url else "embedded (not durable)",
                    "maxBadMacErrors": config.policy.limits.max_bad_mac_errors,
                    "maxBadDecryptErrors": config.policy.limits.max_bad_decrypt_errors,
                    "version": __version__,
                }
            },
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        components = runner.app[COMPONENTS]
        loop.add_signal_handler(signal.SIGHUP, components.owners.reload)
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        if work is not None:
            waiters.append(asyncio.create_task(work(components, base)))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
        log.info("stopping")
    finally:
        await runner.cleanup()


async def _connect(url: str, pooler: str) -> asyncpg.Connection | None:
    """A connection, or None after saying on stderr why there is none."""
    try:
        connection: asyncpg.Connection = await asyncpg.connect(url, **connect_options(pooler))
        return connection
    except (OSError, asyncpg.PostgresError) as error:
        print(f"wa-sidecar: cannot connect to PostgreSQL: {error}", file=sys.stderr)
        return None


async def _migrate(config: Config) -> int:
    if config.database_url is None:
        print("wa-sidecar: migrate needs --database-url or WA_SIDECAR_DATABASE_URL", file=sys.stderr)
        return EXIT_CONFIG
    connection = await _connect(config.database_url, config.database_pooler)
    if connection is None:
        return EXIT_UNAVAILABLE
    try:
        applied = await migrate(connection, config.schema.sidecar_schema)
    finally:
        await connection.close()
    print(json.dumps({"schema": config.schema.sidecar_schema, "applied": applied}))
    return 0


async def _check_config(config: Config) -> int:
    summary: dict[str, object] = {
        "listen": f"{config.listen_host}:{config.listen_port}",
        "store": "postgresql" if config.database_url else "embedded",
        "maxBadMacErrors": config.policy.limits.max_bad_mac_errors,
        "maxBadDecryptErrors": config.policy.limits.max_bad_decrypt_errors,
        "criticalStatusCodes": sorted(config.policy.critical_status_codes),
        "apiToken": bool(config.api_token),
        "runtimeToken": bool(config.runtime_token),
    }
    with contextlib.suppress(ConfigError):
        config.check_exposure()
        summary["exposure"] = "ok"
    summary.setdefault("exposure", "refused: non-loopback listener without tokens (see --insecure)")
    if config.owners_file is not None:
        try:
            owners = load_owners(config.owners_file)
        except OwnersError as error:
            print(f"wa-sidecar: owners file {config.owners_file}: {error}", file=sys.stderr)
            return EXIT_CONFIG
        summary["owners"] = {"teams": sorted(owners.teams), "defaultTeam": owners.default_team}
    if config.database_url is not None:
        connection = await _connect(config.database_url, config.database_pooler)
        if connection is None:
            return EXIT_UNAVAILABLE
        try:
            in_table = config.key_store.place is KeyPlace.DATABASE
            problems = await check_schema(connection, config.schema, auth_table=in_table)
            level = await migrated_level(connection, config.schema.sidecar_schema)
            sample = await sample_phone(connection, config.schema) if not problems else None
        finally:
            await connection.close()
        if (problem := version_problem(level, len(MIGRATIONS), config.schema.sidecar_schema)) is not None:
            problems.append(problem)
        if (note := newer_note(level, len(MIGRATIONS), config.schema.sidecar_schema)) is not None:
            summary["schemaNote"] = note
        if problems:
            for problem in problems:
                print(f"wa-sidecar: configuration error: {problem}", file=sys.stderr)
            return EXIT_CONFIG
        summary["schema"] = "ok"
    else:
        sample = None
    try:
        summary["keyStore"] = await check_key_store(config.key_store, sample, config.database_step_timeout)
    except StoreUnavailable as error:
        print(f"wa-sidecar: key store unavailable: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(json.dumps(summary))
    if summary["exposure"] != "ok":  # `serve` would refuse these settings: so does the check
        print(f"wa-sidecar: configuration error: exposure {summary['exposure']}", file=sys.stderr)
        return EXIT_CONFIG
    return 0
