"""The PostgreSQL store (asyncpg pool): the seed schema's auth keys and phones, plus the sidecar's own tables.
Every statement is in store/statements.py (built once from the validated schema mapping); what each step writes
is store/step_writer.py; here are the pool, the one transaction that applies a batch of steps, and the reads.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg

if TYPE_CHECKING:
    pass

from sidecar.config import SchemaMapping
from sidecar.ports import (
    ClosureQuery,
    OutboxRow,
    RestrictionEntry,
    RestrictionQuery,
    StepFailed,
    StoredSession,
    StoreSlow,
)
from sidecar.rules.policy import CloseReason, Counters
from sidecar.rules.records import (
    CloseTrigger,
    ClosureRecord,
    CounterKind,
    DeleteKeys,
    IncrementCounter,
    Logout,
    Notification,
    PhoneRef,
    Step,
    StepResult,
)
from sidecar.store.db_errors import RECONNECT_ERRORS, Fault, classify, pool_exhausted, translated
from sidecar.store.migrations import MIGRATIONS
from sidecar.store.schema_check import SchemaLevel, migrated_level
from sidecar.store.statements import Connection, Statements, deleted_rows, like_prefix
from sidecar.store.step_writer import StepWriter

ACQUIRE_TIMEOUT_SECONDS = 5.0


LOCK_TIMEOUT = "5s"  # a backstop: decisions skip rows locked elsewhere and never wait on them
# The breaker's lock another replica's batch holds is free again within milliseconds: a batch waits this long for
# it (a queue in PostgreSQL instead of parked retries); longer means a session stuck holding it.
BREAKER_LOCK_WAIT = "100ms"
IDLE_IN_TRANSACTION_TIMEOUT = "10s"  # the sidecar never idles inside a transaction: past this its client is gone
KEEPALIVES = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}


# What each limit is for (the configuration reference's table is generated from this).
SESSION_LIMITS_WHY: dict[str, str] = {
    "lock_timeout": f"{LOCK_TIMEOUT}: a backstop. Decisions never wait for a row another session holds (they skip it "
    f"and retry that phone alone; the breaker's lock is waited for at most {BREAKER_LOCK_WAIT}); an operator's close "
    "or a lease waits at most this long, then answers or retries",
    "statement_timeout": "the `--database-command-timeout`, enforced by the server too: a statement its client gave "
    "up on does not run on holding locks",
    "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION_TIMEOUT}: the sidecar never idles inside a "
    "transaction, so a session that does has lost its client (a replica cut off mid-transaction); ending it "
    "releases its locks for the rest of the fleet",
    "tcp_keepalives_idle, _interval, _count": "10 s, 5 s, 3 (direct connections): the server notices a vanished "
    "client within about 25 s instead of the 2 h default. Behind PgBouncer set its `tcp_keepalive*` and "
    "`idle_transaction_timeout` instead (the sidecar's per-transaction limits still apply)",
}


def session_timeouts(command_timeout: float) -> dict[str, str]:
    """What bounds every sidecar session on the server, so none can hold locks for the fleet: a statement runs
    at most the command timeout, a lock is waited for at most LOCK_TIMEOUT, a transaction whose client vanished
    (a replica cut off mid-transaction) is ended after IDLE_IN_TRANSACTION_TIMEOUT, releasing its row locks."""
    return {
        "lock_timeout": LOCK_TIMEOUT,
        "statement_timeout": f"{int(command_timeout * 1000)}ms",
        "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_TIMEOUT,
    }


def connect_options(pooler: str, command_timeout: float | None = None) -> dict[str, Any]:
    """asyncpg options for what sits in front of PostgreSQL. Directly, the timeouts and server-side TCP keepalives
    are session settings from the start. A pooler (PgBouncer) refuses them as startup parameters: each transaction
    sets its timeouts itself (PostgresStore.transaction). Behind PgBouncer in transaction mode consecutive
    statements may run on different server connections, so none may leave a named prepared statement behind.
    Without a command timeout (`migrate`, `check-config`: one operator's connection) nothing is bounded."""
    if pooler == "none" and command_timeout is not None:
        return {"server_settings": {"timezone": "UTC", **session_timeouts(command_timeout), **KEEPALIVES}}
    options: dict[str, Any] = {"server_settings": {"timezone": "UTC"}}
    if pooler == "transaction":
        options["statement_cache_size"] = 0
    return options


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection going back to the pool needs no reset: the sidecar leaves no session state behind (its
    settings and advisory locks are transaction-scoped, LISTEN has a connection of its own), and asyncpg still
    rolls back a transaction left open. asyncpg's default reset (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`) would cost a round trip on every release."""


class PostgresStore:
    def __init__(
        self, pool: asyncpg.Pool, schema: SchemaMapping, command_timeout: float = 30.0, pooler: str = "none"
    ) -> None:
        self._pool = pool
        self._command_timeout = command_timeout
        # Behind a pooler each transaction sets its own timeouts (SET LOCAL: nothing leaks to the next client).
        self._set_timeouts = (
            None
            if pooler == "none"
            else "SELECT " + ", ".join(f"set_config('{name}', '{value}', true)"
                                       for name, value in session_timeouts(command_timeout).items())
        )  # fmt: skip
        self._sql = Statements(schema)
        self._writer = StepWriter(self._sql, schema.logged_out_status)
        self._schema = schema.sidecar_schema
        self._logged_out_status = schema.logged_out_status

    @classmethod
    async def connect(
        cls, url: str, schema: SchemaMapping, max_size: int = 10, command_timeout: float = 30.0, pooler: str = "none"
    ) -> PostgresStore:
        # min_size=0: the sidecar starts (and reports not-ready) while PostgreSQL is still away.
        pool = await asyncpg.create_pool(
            url, min_size=0, max_size=max_size, command_timeout=command_timeout, reset=_keep_session,
            **connect_options(pooler, command_timeout),
        )  # fmt: skip
        return cls(pool, schema, command_timeout, pooler)

    async def close(self) -> None:
        await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool, shared with the fleet decision state (sidecar.store.shared_decisions)."""
        return self._pool

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def sql(self) -> Statements:
        return self._sql

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection. Every database error leaving it is classified (sidecar.store.db_errors): an
        outage raises StoreUnavailable, a timeout StoreSlow, a conflict abort TransientConflict; a statement's
        own error passes through unchanged."""
        acquired = False
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn:
                acquired = True
                yield conn
        except TimeoutError as error:
            if not acquired:
                raise pool_exhausted(ACQUIRE_TIMEOUT_SECONDS) from error
            raise StoreSlow(f"statement timed out after the {self._command_timeout:g} s command timeout") from error
        except Exception as error:
            port_error = translated(error)
            if port_error is error:
                raise
            if isinstance(error, RECONNECT_ERRORS):
                # After a failover the pooled connections still point at the old (now standby) server:
                # drop them all, so the next attempt reconnects and reaches whatever the address now names.
                await self._pool.expire_connections()
            raise port_error from error

    @asynccontextmanager
    async def transaction(self, **options: Any) -> AsyncIterator[Connection]:
        """A pooled connection in a transaction bounded by the session timeouts (session_timeouts)."""
        async with self.connection() as conn, conn.transaction(**options):
            if self._set_timeouts is not None:
                await conn.execute(self._set_timeouts)
            yield conn

    async def enqueue(
        self, conn: Connection, phone: PhoneRef, notification: Notification | None, details: dict[str, Any]
    ) -> None:
        """Put a notification in the outbox inside the caller's transaction."""
        await self._writer.enqueue(conn, phone, notification, details)

    async def enqueue_many(self, conn: Connection, items: Sequence[tuple[PhoneRef, Notification]]) -> None:
        """Put notifications in the outbox inside the caller's transaction, in one round trip."""
        await self._writer.enqueue_many(conn, items)

    latest_schema_version = len(MIGRATIONS)

    async def schema_version(self) -> SchemaLevel:
        """The sidecar schema's migration level (version 0 when `wa-sidecar migrate` never ran)."""
        async with self.connection() as conn:
            return await migrated_level(conn, self._schema)

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def apply(self, steps: Sequence[Step], journal: tuple[str, Sequence[int]] | None = None) -> list[StepResult]:
        async with self.transaction() as conn:
            skip = 0
            if journal is not None:
                instance_id, positions = journal
                applied = await conn.fetchval(self._sql.journal_position, instance_id) or 0
                skip = sum(1 for position in positions if position <= applied)
            fenced = sorted(
                {step.record.phone.organization_phone_id for step in steps[skip:] if isinstance(step, Logout)}
            )
            if fenced:  # lock the rows fenced closes check in id order, as fleet decisions do: no deadlock
                await conn.execute(self._sql.lock_counters, fenced)
            results: list[StepResult] = [None] * skip
            index = skip
            while index < len(steps):
                run = _groupable_run(steps, index)
                if len(run) > 1 and await self._apply_run(conn, run, results):
                    index += len(run)
                    continue
                for offset in range(max(1, len(run))):  # one at a time: a failure names its step
                    try:
                        results.append(await self._writer.apply(conn, steps[index + offset]))
                    except Exception as error:
                        if classify(error) is not Fault.OWN:
                            raise
                        raise StepFailed(index + offset, error) from error
                index += max(1, len(run))
            if journal is not None:
                await conn.execute(self._sql.set_journal_position, journal[0], journal[1][-1])
            return results

    async def _apply_run(self, conn: Connection, run: Sequence[Step], results: list[StepResult]) -> bool:
        """Increments and heal deletions of a run in two statements (they touch different tables, so their order
        within the run does not matter); the flips' notifications after, in order. False (nothing kept) if a
        statement failed on its own: the caller then applies the run step by step to name the failing one."""
        increments: dict[int, list[Any]] = {}
        deletes: tuple[list[int], list[int], list[str], list[str]] = ([], [], [], [])
        for position, step in enumerate(run):
            if isinstance(step, IncrementCounter):
                p = step.phone
                row = increments.setdefault(p.organization_phone_id, [p.organization_id, p.phone_user, 0, 0])
                row[1] = row[1] or p.phone_user
                row[2 if step.kind is CounterKind.BAD_MAC else 3] += 1
            elif isinstance(step, DeleteKeys):
                for prefix in step.key_prefixes:
                    deletes[0].append(position)
                    deletes[1].append(step.phone.organization_id)
                    deletes[2].append(step.phone.phone_user or "")
                    deletes[3].append(like_prefix(prefix))
        deleted = [0] * len(run)
        try:
            async with conn.transaction():  # a savepoint: a failure here leaves the batch's earlier steps intact
                if increments:
                    rows = list(increments.values())
                    await conn.execute(
                        self._sql.increment_many, list(increments), [r[0] for r in rows], [r[1] for r in rows],
                        [r[2] for r in rows], [r[3] for r in rows],
                    )  # fmt: skip
                if deletes[0]:
                    for record in await conn.fetch(self._sql.delete_many, *deletes):
                        deleted[record["step"]] += 1
                for step in run:
                    if isinstance(step, IncrementCounter) and step.notification is not None:
                        await self._writer.enqueue(conn, step.phone, step.notification, {})
        except Exception as error:
            if classify(error) is not Fault.OWN:
                raise
            return False
        results.extend(deleted[i] if isinstance(step, DeleteKeys) else None for i, step in enumerate(run))
        return True

    async def applied_journal_position(self, instance_id: str) -> int:
        async with self.connection() as conn:
            return int(await conn.fetchval(self._sql.read_journal_position, instance_id) or 0)

    async def load_sessions(self, closed_within: float | None = None) -> list[StoredSession]:
        async with self.connection() as conn:
            rows = await conn.fetch(self._sql.load_sessions, closed_within)
        return [
            StoredSession(
                PhoneRef(row["organization_id"], row["organization_phone_id"], row["phone_user"]),
                Counters(row["bad_mac_errors"], row["bad_decrypt_errors"]),
                row["closed"],
                row["closed_epoch"],
            )
            for row in rows
        ]

    async def prune(self, older_than: float, batch: int) -> dict[str, int]:
        """Each statement deletes at most `batch` rows in its own short transaction; between them the event loop
        runs, so retention never holds a lock or the loop for long."""
        deleted: dict[str, int] = {}
        for table, statement in self._sql.prune.items():
            deleted[table] = 0
            while True:
                async with self.connection() as conn:
                    cutoff = await conn.fetchval("SELECT now() - make_interval(secs => $1)", older_than)
                    count = deleted_rows(await conn.execute(statement, cutoff, batch))
                deleted[table] += count
                if count < batch:
                    break
                await asyncio.sleep(0)
        return deleted

    async def recent_closures(self, organization_phone_id: int, limit: int) -> list[ClosureRecord]:
        async with self.connection() as conn:
            rows = await conn.fetch(self._sql.recent_closures, organization_phone_id, limit)
        return [_closure_from_row(row) for row in rows]

    async def list_closures(self, query: ClosureQuery) -> list[ClosureRecord]:
        before_at, before_id = query.before if query.before is not None else (None, None)
        async with self.connection() as conn:
            rows = await conn.fetch(
                self._sql.list_closures, query.organization_id, query.organization_phone_id, query.reason,
                query.since, query.until, before_at, before_id, query.limit,
            )  # fmt: skip
        return [_closure_from_row(row) for row in rows]

    async def restrictions_in_force(self) -> list[RestrictionEntry]:
        async with self.connection() as conn:
            return [_restriction(row) for row in await conn.fetch(self._sql.restrictions_all)]

    async def phone_restrictions(
        self, organization_phone_id: int, history: int
    ) -> tuple[list[RestrictionEntry], list[RestrictionEntry]]:
        async with self.connection() as conn:
            current = await conn.fetch(self._sql.restrictions_of, organization_phone_id)
            past = await conn.fetch(self._sql.restriction_history_of, organization_phone_id, history)
        return [_restriction(row) for row in current], [_restriction(row) for row in past]

    async def list_restrictions(self, query: RestrictionQuery) -> list[RestrictionEntry]:
        async with self.connection() as conn:
            if query.active:
                after = query.after or (None, None)
                rows = await conn.fetch(
                    self._sql.restrictions_page, query.organization_id, query.kind, *after, query.limit
                )
            else:
                rows = await conn.fetch(
                    self._sql.restriction_history_page, query.organization_id, query.kind, query.before, query.limit
                )
        return [_restriction(row) for row in rows]

    async def claim_due(self, limit: int, lease_seconds: float) -> list[OutboxRow]:
        async with self.connection() as conn:
            rows = await conn.fetch(self._sql.claim_due, limit, lease_seconds)
        return sorted((_outbox_row(row) for row in rows), key=lambda row: row.seq)

    async def finish(
        self,
        notification_id: str,
        status: str,
        attempts: int,
        error: str | None,
        team: str | None,
        retry_in: float | None = None,
    ) -> None:
        async with self.connection() as conn:
            await conn.execute(self._sql.finish, notification_id, status, attempts, error, team, retry_in or 0.0)

    async def list_notifications(self, status: str | None, limit: int) -> list[OutboxRow]:
        async with self.connection() as conn:
            rows = await conn.fetch(self._sql.list_notifications, status, limit)
        return [_outbox_row(row) for row in rows]

    async def outbox_depth(self) -> int:
        async with self.connection() as conn:
            return int(await conn.fetchval(self._sql.outbox_depth))


def _groupable_run(steps: Sequence[Step], start: int) -> Sequence[Step]:
    """The longest run from `start` of increments and heal deletions that need no lookup (the phone's number
    is known; observe mode only counts). Empty when the step at `start` is of another kind."""
    end = start
    while end < len(steps):
        step = steps[end]
        if isinstance(step, IncrementCounter) or (
            isinstance(step, DeleteKeys) and not step.observe and step.phone.phone_user
        ):
            end += 1
        else:
            break
    return steps[start:end]


def _restriction(row: asyncpg.Record) -> RestrictionEntry:
    return RestrictionEntry(
        row["organization_id"], row["organization_phone_id"], row["kind"], row["active"], row["at"], row["until"],
        row["code"], row["detail"], row["seq"],
    )  # fmt: skip


def _closure_from_row(row: asyncpg.Record) -> ClosureRecord:
    return ClosureRecord(
        closure_id=row["closure_id"],
        phone=PhoneRef(row["organization_id"], row["organization_phone_id"]),
        reason=CloseReason(row["reason"]),
        trigger=CloseTrigger(row["trigger"]),
        detail=row["detail"],
        counters=Counters(row["bad_mac_errors"], row["bad_decrypt_errors"]),
        started_at=row["started_at"],
        socket=row["socket"],
        keys_deleted=row["keys_deleted"],
        steps=json.loads(row["steps"]),
        duration_seconds=row["duration_seconds"],
    )


def _outbox_row(row: asyncpg.Record) -> OutboxRow:
    return OutboxRow(
        notification_id=row["notification_id"],
        event=row["event"],
        organization_id=row["organization_id"],
        organization_phone_id=row["organization_phone_id"],
        occurred_at=row["occurred_at"],
        stats=json.loads(row["stats"]),
        reason=row["reason"],
        details=json.loads(row["details"]),
        trace_id=row["trace_id"],
        status=row["status"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        team=row["team"],
        delivered_at=row["delivered_at"],
        seq=row["seq"],
    )
