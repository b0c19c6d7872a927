"""Fleet mode: socket ownership leases and routed commands in PostgreSQL (ports.SocketLeases).

Leases are per replica, not per phone (as etcd leases and Consul sessions bind many keys to one keepalive): a
replica's heartbeat renews its one row in `replica_leases`, and a phone's row in `socket_owners` is written only
when it is claimed, released or taken over; it is valid while its replica's lease is live. An idle fleet costs
one row write per replica per heartbeat, whatever its sessions. Claims that arrive together (a runtime
reconnecting with its phones) are one statement; a takeover raises the phone's fencing generation, and commands
still addressed to the replica it was taken from are refused. Rows written by a release before migration 9
carry their own renewed `lease_until`, which still counts for them (a rolling upgrade).

A replica records each phone whose runtime connection it holds; a command
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
from sidecar.retrying import RetryLog
from sidecar.store.db_errors import UNAVAILABLE_ERRORS
from sidecar.store.postgres import ACQUIRE_TIMEOUT_SECONDS, PostgresStore
from sidecar.store.sqlnames import quote_identifier

log = logging.getLogger("sidecar.leases")

LEASE_SECONDS = 15.0
COMMANDS_KEPT_SECONDS = 3600.0
OWED_KEPT_SECONDS = 7 * 86400.0  # an owed end waits this long for its runtime
FORGET_BATCH = 1000


class PostgresLeases:
    def __init__(self, store: PostgresStore, instance: str, lease_seconds: float = LEASE_SECONDS) -> None:
        self._store = store
        self.instance = instance
        self._lease_seconds = self.lease_seconds = lease_seconds
        s = quote_identifier(store.schema)
        owners, commands = f"{s}.socket_owners", f"{s}.socket_commands"
        self.channel = f"wa_sidecar_commands_{store.schema}"[:63]
        replicas = f"{s}.replica_leases"
        # A phone's row is live while its replica's lease is (or, for a row of a release before migration 9,
        # while its own lease_until is).
        live = (
            f"(o.lease_until >= now() OR EXISTS (SELECT 1 FROM {replicas} AS r WHERE r.instance = o.instance "
            "AND r.lease_until >= now()))"
        )
        # Many phones in one statement ($1 ids, $3 connection ids); the rows it won come back, the others are held
        # by a live replica. A row taken from another replica gets the next generation; commands still addressed
        # to the replica it was taken from are refused (they would reach a runtime that is gone).
        self._claim = (
            f"WITH claimed AS (INSERT INTO {owners} AS o (organization_phone_id, instance, connection_id, "
            "lease_until) SELECT phone, $2, connection, now() + make_interval(secs => $4) FROM "
            "unnest($1::bigint[], $3::bigint[]) AS c(phone, connection) ORDER BY phone "
            "ON CONFLICT (organization_phone_id) DO UPDATE SET instance = EXCLUDED.instance, "
            "connection_id = EXCLUDED.connection_id, "
            "generation = o.generation + CASE WHEN o.instance = EXCLUDED.instance THEN 0 ELSE 1 END, "
            f"lease_until = EXCLUDED.lease_until WHERE o.instance = EXCLUDED.instance OR NOT {live} "
            "RETURNING organization_phone_id, generation), "
            f"fenced AS (UPDATE {commands} AS f SET status = 'unreachable', error = 'fenced: the phone was taken "
            "over by another replica' FROM claimed WHERE f.organization_phone_id = claimed.organization_phone_id "
            "AND f.status = 'pending' AND f.instance <> $2) "
            "SELECT organization_phone_id FROM claimed"
        )
        self._holders = (
            f"SELECT organization_phone_id, instance FROM {owners} AS o WHERE organization_phone_id = "
            f"ANY($1::bigint[]) AND {live}"
        )
        self._holder = f"SELECT instance FROM {owners} AS o WHERE organization_phone_id = $1 AND {live}"
        # The heartbeat: this replica's one row, with how many sessions it holds (the breaker's denominator).
        self._renew_replica = (
            f"INSERT INTO {replicas} AS r (instance, lease_until, sessions) VALUES ($1, now() + make_interval("
            "secs => $2), $3) ON CONFLICT (instance) DO UPDATE SET lease_until = EXCLUDED.lease_until, "
            "sessions = EXCLUDED.sessions"
        )

        self._release = f"DELETE FROM {owners} WHERE instance = $1 AND organization_phone_id = ANY($2::bigint[])"
        self._send = (
            f"INSERT INTO {commands} (command_id, organization_phone_id, instance, body) VALUES ($1, $2, $3, $4::jsonb)"
        )
        self._result = f"SELECT status, error, keys_deleted FROM {commands} WHERE command_id = $1"
        # Delivered only while this replica still holds the phone (a replica that was paused past its lease and
        # lost the phone to another refuses what was addressed to it then).
        holds = (
            f"EXISTS (SELECT 1 FROM {owners} AS o WHERE o.organization_phone_id = c.organization_phone_id "
            "AND o.instance = $1)"
        )
        self._take = (
            f"UPDATE {commands} AS c SET status = CASE WHEN {holds} THEN 'delivering' ELSE 'unreachable' END, "
            f"error = CASE WHEN {holds} THEN NULL ELSE 'fenced: this replica no longer holds the phone' END "
            "WHERE instance = $1 AND status = 'pending' "
            "RETURNING command_id, organization_phone_id, body::text AS body, status"
        )
        self._finish = f"UPDATE {commands} SET status = $2, error = $3, keys_deleted = $4 WHERE command_id = $1"
        # Housekeeping, a bounded batch at a time.
        self._forget = (
            f"DELETE FROM {commands} WHERE command_id IN (SELECT command_id FROM {commands} WHERE created_at < now() - "
            "make_interval(secs => $1) AND (status <> 'owed' OR created_at < now() - make_interval(secs => $2)) "
            "LIMIT $3)"
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
            f"WITH gone AS (DELETE FROM {replicas} WHERE left(instance, length($1) + 1) = $1 || '/' "
            f"AND instance <> $2) DELETE FROM {owners} WHERE left(instance, length($1) + 1) = $1 || '/' "
            "AND instance <> $2 RETURNING organization_phone_id"
        )

    async def claim(self, organization_phone_id: int, connection_id: int) -> str | None:
        return (await self.claim_many([(organization_phone_id, connection_id)])).get(organization_phone_id)

    async def claim_many(self, claims: Sequence[tuple[int, int]]) -> dict[int, str]:
        """Claim (phone, connection id) pairs in one statement; returns the phones a live replica holds instead,
        with their holder."""
        if not claims:
            return {}
        unique = dict(claims)  # one row per phone in the statement (the last connection's claim)
        phones, connections = list(unique), list(unique.values())
        async with self._store.connection() as conn:
            won = {
                row[0] for row in await conn.fetch(self._claim, phones, self.instance, connections, self._lease_seconds)
            }
            lost = [phone for phone in phones if phone not in won]
            if not lost:
                return {}
            rows = await conn.fetch(self._holders, lost)
        return {row["organization_phone_id"]: row["instance"] for row in rows}

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

    async def renew(self, sessions: int) -> None:
        """The heartbeat: this replica's lease (every phone it holds stays owned), and how many it holds."""
        async with self._store.connection() as conn:
            await conn.execute(self._renew_replica, self.instance, self._lease_seconds, sessions)

    async def forget_commands(self, batch: int = FORGET_BATCH) -> int:
        """Housekeeping: answered commands older than an hour (owed ends after a week), a batch at a time."""
        async with self._store.connection() as conn:
            status = await conn.execute(self._forget, COMMANDS_KEPT_SECONDS, OWED_KEPT_SECONDS, batch)
        return int(status.split()[-1])

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
        return [
            (row["command_id"], row["organization_phone_id"], json.loads(row["body"]))
            for row in rows
            if row["status"] == "delivering"
        ]

    async def finish(self, command_id: str, status: str, error: str | None, keys_deleted: int | None = None) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._finish, command_id, status, error, keys_deleted)

    async def listen(self, url: str, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Wake the command deliverer when a command for this replica is queued; reconnects while running."""
        retries = RetryLog(log, "listen for routed commands", logging.INFO, meanwhile="polling meanwhile")
        while not stop.is_set():
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(url, timeout=ACQUIRE_TIMEOUT_SECONDS)
                await connection.add_listener(self.channel, lambda *args: wake() if args[-1] == self.instance else None)
                retries.succeeded()
                wake()  # commands queued while not listening
                while not stop.is_set() and not connection.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 2.0)
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as error:  # type: ignore[misc]
                retries.failed(error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
