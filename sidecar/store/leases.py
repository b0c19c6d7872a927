"""Fleet mode: socket ownership leases and routed commands in PostgreSQL (ports.SocketLeases).

A replica records each phone whose runtime connection it holds, with a lease its heartbeat renews; a command
decided on another replica is written to `socket_commands` and the owner is woken with NOTIFY (a periodic
poll is the fallback when a notification is missed, or where LISTEN is not available, as behind PgBouncer in
transaction mode); the owner delivers it over its connection and writes the answer back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from sidecar.ports import OwedEnd
from sidecar.store.db_errors import UNAVAILABLE_ERRORS
from sidecar.store.postgres import ACQUIRE_TIMEOUT_SECONDS, PostgresStore
from sidecar.store.sqlnames import quote_identifier

log = logging.getLogger("sidecar.leases")

LEASE_SECONDS = 15.0
COMMANDS_KEPT_SECONDS = 3600.0
OWED_KEPT_SECONDS = 7 * 86400.0  # an owed end waits this long for its runtime


class PostgresLeases:
    def __init__(self, store: PostgresStore, instance: str, lease_seconds: float = LEASE_SECONDS) -> None:
        self._store = store
        self.instance = instance
        self._lease_seconds = lease_seconds
        s = quote_identifier(store.schema)
        owners, commands = f"{s}.socket_owners", f"{s}.socket_commands"
        self.channel = f"wa_sidecar_commands_{store.schema}"[:63]
        self._claim = (
            f"INSERT INTO {owners} AS o (organization_phone_id, instance, connection_id, lease_until) "
            "VALUES ($1, $2, $3, now() + make_interval(secs => $4)) ON CONFLICT (organization_phone_id) DO UPDATE SET "
            "instance = EXCLUDED.instance, connection_id = EXCLUDED.connection_id, "
            "generation = o.generation + CASE WHEN o.instance = EXCLUDED.instance THEN 0 ELSE 1 END, "
            "lease_until = EXCLUDED.lease_until WHERE o.instance = EXCLUDED.instance OR o.lease_until < now() "
            "RETURNING instance"
        )
        self._holder = f"SELECT instance FROM {owners} WHERE organization_phone_id = $1 AND lease_until >= now()"
        self._release = f"DELETE FROM {owners} WHERE instance = $1 AND organization_phone_id = ANY($2::bigint[])"
        self._renew = (
            f"UPDATE {owners} SET lease_until = now() + make_interval(secs => $3) "
            "WHERE instance = $1 AND organization_phone_id = ANY($2::bigint[])"
        )
        self._send = (
            f"INSERT INTO {commands} (command_id, organization_phone_id, instance, body) VALUES ($1, $2, $3, $4::jsonb)"
        )
        self._result = f"SELECT status, error, keys_deleted FROM {commands} WHERE command_id = $1"
        self._take = (
            f"UPDATE {commands} SET status = 'delivering' WHERE instance = $1 AND status = 'pending' "
            "RETURNING command_id, organization_phone_id, body::text AS body"
        )
        self._finish = f"UPDATE {commands} SET status = $2, error = $3, keys_deleted = $4 WHERE command_id = $1"
        self._forget = (
            f"DELETE FROM {commands} WHERE created_at < now() - make_interval(secs => $1) "
            f"AND (status <> 'owed' OR created_at < now() - make_interval(secs => $2))"
        )
        # Owed ends (link/owed_ends.py): one row per phone, any replica may take it when the phone shows up.
        self._owe = (
            f"INSERT INTO {commands} (command_id, organization_phone_id, instance, body, status) "
            f"SELECT $1, $2, '', $3::jsonb, 'owed' WHERE NOT EXISTS (SELECT 1 FROM {commands} "
            "WHERE organization_phone_id = $2 AND status = 'owed')"
        )
        self._owed = f"SELECT DISTINCT organization_phone_id FROM {commands} WHERE status = 'owed'"
        self._take_owed = (
            f"UPDATE {commands} SET status = 'delivering', instance = $2 WHERE command_id = (SELECT command_id FROM "
            f"{commands} WHERE organization_phone_id = $1 AND status = 'owed' LIMIT 1 FOR UPDATE SKIP LOCKED) "
            "RETURNING command_id, body::text AS body"
        )
        self._owed_back = f"UPDATE {commands} SET status = 'owed', instance = '' WHERE command_id = $1"
        self._owed_moot = f"UPDATE {commands} SET status = 'moot' WHERE command_id = $1"
        # Delivered: the close that owed it says so (the latest of the phone's closes that found no socket).
        self._owed_delivered = (
            f"WITH done AS (UPDATE {commands} SET status = 'ok' WHERE command_id = $1 RETURNING organization_phone_id) "
            f"UPDATE {s}.closures SET socket = 'ended (on reconnect)' WHERE closure_id = (SELECT closure_id FROM "
            f"{s}.closures WHERE organization_phone_id = (SELECT organization_phone_id FROM done) "
            "AND socket = 'unreachable' ORDER BY started_at DESC LIMIT 1)"
        )
        sequences = f"{s}.link_sequences"
        self._acknowledged = f"SELECT acked FROM {sequences} WHERE runtime_id = $1"
        self._acknowledge = (
            f"INSERT INTO {sequences} AS l (runtime_id, acked) VALUES ($1, $2) ON CONFLICT (runtime_id) DO UPDATE "
            "SET acked = GREATEST(l.acked, EXCLUDED.acked), updated_at = now()"
        )
        # A restarted process of the same instance (the same pod name) is not a second runtime: its dead
        # predecessor's leases ("<instance>/<process id>") go at start, so the new process can claim them.
        self._predecessors = (
            f"DELETE FROM {owners} WHERE left(instance, length($1) + 1) = $1 || '/' AND instance <> $2 "
            "RETURNING organization_phone_id"
        )

    async def claim(self, organization_phone_id: int, connection_id: int) -> str | None:
        async with self._store.connection() as conn:
            won = await conn.fetchval(
                self._claim, organization_phone_id, self.instance, connection_id, self._lease_seconds
            )
            if won is not None:
                return None
            holder: str | None = await conn.fetchval(self._holder, organization_phone_id)
        return holder

    async def owe(self, organization_phone_id: int, reason: str, detail: str) -> None:
        body = json.dumps({"type": "session.end", "reason": reason, "detail": detail, "logout": True})
        async with self._store.connection() as conn:
            await conn.execute(self._owe, uuid.uuid4().hex, organization_phone_id, body)

    async def owed_phones(self) -> set[int]:
        async with self._store.connection() as conn:
            return {row["organization_phone_id"] for row in await conn.fetch(self._owed)}

    async def take_owed(self, organization_phone_id: int) -> OwedEnd | None:
        async with self._store.connection() as conn:
            row = await conn.fetchrow(self._take_owed, organization_phone_id, self.instance)
        if row is None:
            return None
        body = json.loads(row["body"])
        return OwedEnd(row["command_id"], organization_phone_id, str(body["reason"]), str(body["detail"]))

    async def owed_done(self, end: OwedEnd, delivered: bool) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._owed_delivered if delivered else self._owed_back, end.command_id)

    def forget_owed(self, organization_phone_ids: list[int]) -> None:
        """Rows stay: another replica may still meet the phone; they expire after OWED_KEPT_SECONDS."""

    async def owed_dropped(self, end: OwedEnd) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._owed_moot, end.command_id)

    async def acknowledged(self, runtime_id: str) -> int:
        """The last event seq any replica acknowledged to this runtime id (0: none)."""
        async with self._store.connection() as conn:
            return int(await conn.fetchval(self._acknowledged, runtime_id) or 0)

    async def acknowledge(self, runtime_id: str, up_to: int) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._acknowledge, runtime_id, up_to)

    async def release_predecessors(self, instance: str) -> int:
        """Drop the leases an earlier process of `instance` left behind; returns how many."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(self._predecessors, instance, self.instance)
        return len(rows)

    async def release(self, organization_phone_ids: Sequence[int]) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._release, self.instance, list(organization_phone_ids))

    async def renew(self, organization_phone_ids: Sequence[int]) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._renew, self.instance, list(organization_phone_ids), self._lease_seconds)
            await conn.execute(self._forget, COMMANDS_KEPT_SECONDS, OWED_KEPT_SECONDS)

    async def owner(self, organization_phone_id: int) -> str | None:
        async with self._store.connection() as conn:
            holder: str | None = await conn.fetchval(self._holder, organization_phone_id)
        return holder

    async def send(self, owner: str, organization_phone_id: int, body: dict[str, Any]) -> str:
        command_id = uuid.uuid4().hex
        async with self._store.transaction() as conn:
            await conn.execute(self._send, command_id, organization_phone_id, owner, json.dumps(body))
            await conn.execute("SELECT pg_notify($1, $2)", self.channel, owner)
        return command_id

    async def result(self, command_id: str) -> tuple[str, str | None, int | None]:
        async with self._store.connection() as conn:
            row = await conn.fetchrow(self._result, command_id)
        if row is None:
            return "unreachable", "command lost", None
        return row["status"], row["error"], row["keys_deleted"]

    async def take_commands(self) -> list[tuple[str, int, dict[str, Any]]]:
        async with self._store.connection() as conn:
            rows = await conn.fetch(self._take, self.instance)
        return [(row["command_id"], row["organization_phone_id"], json.loads(row["body"])) for row in rows]

    async def finish(self, command_id: str, status: str, error: str | None, keys_deleted: int | None = None) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._finish, command_id, status, error, keys_deleted)

    async def listen(self, url: str, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Wake the command deliverer when a command for this replica is queued; reconnects while running."""
        while not stop.is_set():
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(url, timeout=ACQUIRE_TIMEOUT_SECONDS)
                await connection.add_listener(self.channel, lambda *args: wake() if args[-1] == self.instance else None)
                wake()  # commands queued while not listening
                while not stop.is_set() and not connection.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 2.0)
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as error:  # type: ignore[misc]
                log.info("command listener unavailable (%s); polling meanwhile", error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
