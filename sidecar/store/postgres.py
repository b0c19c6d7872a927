"""The PostgreSQL store (asyncpg pool): the seed schema's auth keys and phones, plus the sidecar's own tables.

Over 300 lines because every statement lives in `_Sql`, built once from the validated schema mapping, beside
the one transaction that applies a batch of steps; splitting them would scatter the quoting rules.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from sidecar.config import SchemaMapping
from sidecar.ports import OutboxRow, StepFailed, StoredSession, StoreSlow
from sidecar.rules.jid import bare_number
from sidecar.rules.policy import CloseReason, Counters
from sidecar.rules.records import (
    CloseTrigger,
    ClosureRecord,
    CounterKind,
    DeleteKeys,
    IncrementCounter,
    Logout,
    LogoutResult,
    Notification,
    PhoneRef,
    RecordDecision,
    ResetCounters,
    Step,
    StepOutcome,
    StepResult,
    closed_details,
)
from sidecar.store.db_errors import RECONNECT_ERRORS, Fault, classify, pool_exhausted, translated
from sidecar.store.migrations import MIGRATIONS
from sidecar.store.sqlnames import quote_identifier as q
from sidecar.store.sqlnames import quote_qualified

ACQUIRE_TIMEOUT_SECONDS = 5.0
LOGOUT_PARTS = ("authKeys", "phoneStatus", "closureRecord", "counters")

Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching `prefix` literally ('_' and '%' are wildcards otherwise)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class _Sql:
    """Every statement, built once from the (validated) schema mapping."""

    def __init__(self, m: SchemaMapping) -> None:
        s = q(m.sidecar_schema)
        auth, phone = quote_qualified(m.auth_table), quote_qualified(m.phone_table)
        a_org, a_phone, a_key = q(m.auth_organization_column), q(m.auth_phone_column), q(m.auth_key_column)
        self.phone_jid = f"SELECT {q(m.phone_jid_column)} FROM {phone} WHERE {q(m.phone_id_column)} = $1"
        self.delete_prefixed = (
            f"DELETE FROM {auth} WHERE {a_org} = $1 AND {a_phone} = $2 AND {a_key} LIKE ANY($3::text[])"
        )
        self.delete_all = f"DELETE FROM {auth} WHERE {a_org} = $1 AND {a_phone} = $2"
        # Observe mode: what a heal or a logout would delete, counted.
        self.count_prefixed = (
            f"SELECT count(*) FROM {auth} WHERE {a_org} = $1 AND {a_phone} = $2 AND {a_key} LIKE ANY($3::text[])"
        )
        self.count_all = f"SELECT count(*) FROM {auth} WHERE {a_org} = $1 AND {a_phone} = $2"
        self.insert_decision = (
            f"INSERT INTO {s}.decisions (decision_id, decision, decided_at, organization_id, organization_phone_id, "
            "detail) VALUES ($1, $2, $3, $4, $5, $6::jsonb) ON CONFLICT (decision_id) DO NOTHING"
        )
        updated = f", {q(m.phone_updated_column)} = now()" if m.phone_updated_column else ""
        self.mark_logged_out = (
            f"UPDATE {phone} SET {q(m.phone_status_column)} = $2, {q(m.phone_qr_column)} = NULL, "
            f"{q(m.phone_last_connected_column)} = now(){updated} WHERE {q(m.phone_id_column)} = $1"
        )
        counters = f"{s}.session_counters"
        self.increment = {
            kind: (
                f"INSERT INTO {counters} AS c (organization_phone_id, organization_id, phone_user, {column}) "
                f"VALUES ($1, $2, $3, 1) ON CONFLICT (organization_phone_id) DO UPDATE SET "
                f"{column} = c.{column} + 1, phone_user = COALESCE(EXCLUDED.phone_user, c.phone_user), "
                "updated_at = now()"
            )
            for kind, column in (
                (CounterKind.BAD_MAC, "bad_mac_errors"),
                (CounterKind.BAD_DECRYPT, "bad_decrypt_errors"),
            )
        }
        # A run of increments in one statement: $1 phone ids, $2 organizations, $3 phone users, $4 Bad MAC and $5
        # Bad Decrypt counts to add (the batch's increments of one phone summed).
        self.increment_many = (
            f"INSERT INTO {counters} AS c (organization_phone_id, organization_id, phone_user, bad_mac_errors, "
            "bad_decrypt_errors) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::int[]) "
            "ON CONFLICT (organization_phone_id) DO UPDATE SET bad_mac_errors = c.bad_mac_errors + "
            "EXCLUDED.bad_mac_errors, bad_decrypt_errors = c.bad_decrypt_errors + EXCLUDED.bad_decrypt_errors, "
            "phone_user = COALESCE(EXCLUDED.phone_user, c.phone_user), updated_at = now()"
        )
        # A run of heals' deletions in one statement: one row per (step, pattern); the deleted rows name their step.
        self.delete_many = (
            f"WITH t AS (SELECT * FROM unnest($1::int[], $2::bigint[], $3::text[], $4::text[]) "
            f"AS t(step, organization_id, phone_user, pattern)) DELETE FROM {auth} AS a USING t "
            f"WHERE a.{a_org} = t.organization_id AND a.{a_phone} = t.phone_user AND a.{a_key} LIKE t.pattern "
            "RETURNING t.step"
        )
        # Counters cleared: on `open` ($4 NULL, the phone is active) or by a close ($4 the logout's time).
        self.set_counters = (
            f"INSERT INTO {counters} AS c (organization_phone_id, organization_id, phone_user, closed_at, phase, "
            "logged_out_observed) VALUES ($1, $2, $3, $4, CASE WHEN $4::timestamptz IS NULL THEN 'active' "
            "ELSE 'closed' END, $5) ON CONFLICT (organization_phone_id) DO UPDATE SET "
            "bad_mac_errors = 0, bad_decrypt_errors = 0, closed_at = EXCLUDED.closed_at, phase = EXCLUDED.phase, "
            "logged_out_observed = EXCLUDED.logged_out_observed, recent = NULL, loops = NULL, close_claimed_by = NULL, "
            "close_lease_until = NULL, phone_user = COALESCE(EXCLUDED.phone_user, c.phone_user), updated_at = now()"
        )
        # Fleet mode: a close's database half applies only while the row still carries the close's generation.
        self.close_fence = f"SELECT phase, generation FROM {counters} WHERE organization_phone_id = $1 FOR UPDATE"
        self.lock_counters = (
            f"SELECT 1 FROM {counters} WHERE organization_phone_id = ANY($1::bigint[]) "
            "ORDER BY organization_phone_id FOR UPDATE"
        )
        # Closed phones only within the state TTL ($1 seconds; NULL: all): restore stays bounded by it.
        self.load_sessions = (
            f"SELECT organization_phone_id, organization_id, phone_user, bad_mac_errors, bad_decrypt_errors, "
            f"closed_at IS NOT NULL AS closed, EXTRACT(EPOCH FROM closed_at)::float8 AS closed_epoch FROM {counters} "
            "WHERE (closed_at IS NOT NULL AND ($1::float8 IS NULL OR closed_at > now() - make_interval(secs => $1))) "
            "OR bad_mac_errors > 0 OR bad_decrypt_errors > 0"
        )
        # Retention, a batch at a time ($1: the cutoff, $2: the batch). Rows a close or a hold still needs stay.
        self.prune = {
            "closures": f"DELETE FROM {s}.closures WHERE closure_id IN (SELECT closure_id FROM {s}.closures "
            "WHERE started_at < $1 LIMIT $2)",
            "decisions": f"DELETE FROM {s}.decisions WHERE decision_id IN (SELECT decision_id FROM {s}.decisions "
            "WHERE decided_at < $1 LIMIT $2)",
            "outbox": f"DELETE FROM {s}.outbox WHERE notification_id IN (SELECT notification_id FROM {s}.outbox "
            "WHERE status <> 'pending' AND occurred_at < $1 LIMIT $2)",
            "session_counters": f"DELETE FROM {counters} WHERE organization_phone_id IN (SELECT organization_phone_id "
            f"FROM {counters} WHERE updated_at < $1 AND close_claimed_by IS NULL AND ((phase = 'closed' AND "
            "closed_at < $1) OR (phase = 'active' AND bad_mac_errors = 0 AND bad_decrypt_errors = 0)) LIMIT $2 "
            "FOR UPDATE SKIP LOCKED)",
            "socket_owners": f"DELETE FROM {s}.socket_owners WHERE organization_phone_id IN (SELECT "
            f"organization_phone_id FROM {s}.socket_owners WHERE lease_until < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        }
        self.insert_closure = (
            f"INSERT INTO {s}.closures (closure_id, organization_id, organization_phone_id, reason, trigger, "
            "detail, bad_mac_errors, bad_decrypt_errors, socket, keys_deleted, steps, started_at, duration_seconds) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, "
            "EXTRACT(EPOCH FROM clock_timestamp() - $12)) ON CONFLICT (closure_id) DO NOTHING"
        )
        self.recent_closures = (
            f"SELECT * FROM {s}.closures WHERE organization_phone_id = $1 ORDER BY started_at DESC LIMIT $2"
        )
        self.journal_position = f"SELECT position FROM {s}.journal_positions WHERE instance_id = $1 FOR UPDATE"
        self.set_journal_position = (
            f"INSERT INTO {s}.journal_positions AS j (instance_id, position) VALUES ($1, $2) "
            "ON CONFLICT (instance_id) DO UPDATE SET position = GREATEST(j.position, EXCLUDED.position)"
        )
        self.schema_version = f"SELECT max(version) FROM {s}.schema_migrations"
        outbox = f"{s}.outbox"
        self.enqueue = (
            f"INSERT INTO {outbox} (notification_id, event, organization_id, organization_phone_id, occurred_at, "
            "stats, reason, details, trace_id) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::jsonb, $9) "
            "ON CONFLICT (notification_id) DO NOTHING"
        )
        # The oldest pending notification of each session, if it is due: later ones of a session wait, so a
        # receiver sees a session's events in order. The lease makes another replica (or a restart) retry
        # a delivery that never reported back.
        self.claim_due = (
            f"UPDATE {outbox} AS o SET next_attempt_at = now() + make_interval(secs => $2) "
            f"WHERE o.notification_id IN (SELECT c.notification_id FROM {outbox} AS c "
            "WHERE c.status = 'pending' AND c.next_attempt_at <= now() AND NOT EXISTS ("
            f"SELECT 1 FROM {outbox} AS e WHERE e.status = 'pending' "
            "AND e.organization_phone_id = c.organization_phone_id AND e.seq < c.seq) "
            "ORDER BY c.seq LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING o.*"
        )
        self.finish = (
            f"UPDATE {outbox} SET status = $2, attempts = $3, last_error = $4, team = $5, "
            "next_attempt_at = now() + make_interval(secs => $6), "
            "delivered_at = CASE WHEN $2 = 'delivered' THEN now() ELSE delivered_at END WHERE notification_id = $1"
        )
        self.list_notifications = (
            f"SELECT * FROM {outbox} WHERE ($1::text IS NULL OR status = $1) ORDER BY seq DESC LIMIT $2"
        )
        self.outbox_depth = f"SELECT count(*) FROM {outbox} WHERE status = 'pending'"
        self.read_journal_position = f"SELECT position FROM {s}.journal_positions WHERE instance_id = $1"


def _deleted_rows(status: str) -> int:
    return int(status.split()[-1])


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, schema: SchemaMapping, command_timeout: float = 30.0) -> None:
        self._pool = pool
        self._command_timeout = command_timeout
        self._sql = _Sql(schema)
        self._schema = schema.sidecar_schema
        self._logged_out_status = schema.logged_out_status

    @classmethod
    async def connect(
        cls, url: str, schema: SchemaMapping, max_size: int = 10, command_timeout: float = 30.0
    ) -> PostgresStore:
        # min_size=0: the sidecar starts (and reports not-ready) while PostgreSQL is still away.
        pool = await asyncpg.create_pool(
            url, min_size=0, max_size=max_size, server_settings={"timezone": "UTC"}, command_timeout=command_timeout
        )
        return cls(pool, schema, command_timeout)

    async def close(self) -> None:
        await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool, shared with the fleet decision state (sidecar.store.fleet)."""
        return self._pool

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def sql(self) -> _Sql:
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

    async def enqueue(
        self, conn: Connection, phone: PhoneRef, notification: Notification | None, details: dict[str, Any]
    ) -> None:
        """Put a notification in the outbox inside the caller's transaction."""
        await self._enqueue(conn, phone, notification, details)

    latest_schema_version = len(MIGRATIONS)

    async def schema_version(self) -> int:
        """The sidecar schema's migration level (0 when `wa-sidecar migrate` never ran)."""
        async with self.connection() as conn:
            try:
                return int(await conn.fetchval(self._sql.schema_version) or 0)
            except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
                return 0

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def apply(self, steps: Sequence[Step], journal: tuple[str, Sequence[int]] | None = None) -> list[StepResult]:
        async with self.connection() as conn, conn.transaction():
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
                        results.append(await self._apply_step(conn, steps[index + offset]))
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
                        await self._enqueue(conn, step.phone, step.notification, {})
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
                    count = _deleted_rows(await conn.execute(statement, cutoff, batch))
                deleted[table] += count
                if count < batch:
                    break
                await asyncio.sleep(0)
        return deleted

    async def recent_closures(self, organization_phone_id: int, limit: int) -> list[ClosureRecord]:
        async with self.connection() as conn:
            rows = await conn.fetch(self._sql.recent_closures, organization_phone_id, limit)
        return [_closure_from_row(row) for row in rows]

    async def _apply_step(self, conn: Connection, step: Step) -> StepResult:
        sql = self._sql
        if isinstance(step, IncrementCounter):
            p = step.phone
            await conn.execute(sql.increment[step.kind], p.organization_phone_id, p.organization_id, p.phone_user)
            await self._enqueue(conn, p, step.notification, {})
            return None
        if isinstance(step, ResetCounters):
            p = step.phone
            await conn.execute(sql.set_counters, p.organization_phone_id, p.organization_id, p.phone_user, None, False)
            await self._enqueue(conn, p, step.notification, {})
            return None
        if isinstance(step, DeleteKeys):
            user = await self._bare_number(conn, step.phone)
            if user is None:
                return 0
            patterns = [like_prefix(prefix) for prefix in step.key_prefixes]
            if step.observe:
                return int(await conn.fetchval(sql.count_prefixed, step.phone.organization_id, user, patterns))
            status = await conn.execute(sql.delete_prefixed, step.phone.organization_id, user, patterns)
            return _deleted_rows(status)
        if isinstance(step, RecordDecision):
            phone = step.phone
            await conn.execute(
                sql.insert_decision,
                step.decision_id,
                step.decision,
                step.decided_at,
                phone.organization_id if phone else None,
                phone.organization_phone_id if phone else None,
                json.dumps(step.detail),
            )
            await self._enqueue(conn, phone or PhoneRef(0, 0), step.notification, step.detail)
            return None
        return await self._logout(conn, step)

    async def _bare_number(self, conn: Connection, phone: PhoneRef) -> str | None:
        if phone.phone_user:
            return phone.phone_user
        jid = await conn.fetchval(self._sql.phone_jid, phone.organization_phone_id)
        return bare_number(jid) if jid else None

    async def _logout(self, conn: Connection, step: Logout) -> LogoutResult:
        """Each part in its own savepoint: a part that fails is recorded and the others still run."""
        record, sql = step.record, self._sql
        phone = record.phone
        steps = dict(record.steps)
        timings: dict[str, tuple[int, int]] = {}
        keys_deleted: int | None = None

        async def part(name: str, statement: str, *args: Any) -> str | None:
            started = time.time_ns()
            try:
                async with conn.transaction():
                    status: str = await conn.execute(statement, *args)
            except Exception as error:
                if classify(error) is not Fault.OWN:
                    raise  # an outage or a timeout aborts the whole batch, to be retried
                steps[name] = f"{StepOutcome.FAILED}: {type(error).__name__}: {error}"
                return None
            finally:
                timings[name] = (started, time.time_ns())
            steps[name] = StepOutcome.OK
            return status

        if step.generation is not None:
            fence = await conn.fetchrow(sql.close_fence, phone.organization_phone_id)
            if fence is None or fence["phase"] != "closing" or fence["generation"] != step.generation:
                fenced = f"{StepOutcome.SKIPPED}: fenced (the close of generation {step.generation} is not current)"
                return LogoutResult(None, {**steps, **dict.fromkeys(LOGOUT_PARTS, fenced)}, {})
        user = await self._bare_number(conn, phone)
        if step.observe:
            would = int(await conn.fetchval(sql.count_all, phone.organization_id, user)) if user else 0
            steps["authKeys"] = f"{StepOutcome.SKIPPED}: observe mode, would delete {would}"
            steps["phoneStatus"] = f"{StepOutcome.SKIPPED}: observe mode"
        elif user is None:
            steps["authKeys"] = "skipped: phone not found"
        elif (status := await part("authKeys", sql.delete_all, phone.organization_id, user)) is not None:
            keys_deleted = _deleted_rows(status)
        if not step.observe:
            status = await part(
                "phoneStatus", sql.mark_logged_out, phone.organization_phone_id, self._logged_out_status
            )
            if status is not None and _deleted_rows(status) == 0:
                steps["phoneStatus"] = "skipped: phone not found"
        await part(
            "counters",
            sql.set_counters,
            phone.organization_phone_id,
            phone.organization_id,
            user,
            record.started_at,
            step.observe,
        )
        steps["closureRecord"] = StepOutcome.OK
        started = time.time_ns()
        await conn.execute(
            sql.insert_closure,
            record.closure_id,
            phone.organization_id,
            phone.organization_phone_id,
            str(record.reason),
            str(record.trigger),
            record.detail,
            record.counters.bad_mac_errors,
            record.counters.bad_decrypt_errors,
            record.socket,
            keys_deleted,
            json.dumps(steps),
            record.started_at,
        )
        timings["closureRecord"] = (started, time.time_ns())
        await self._enqueue(conn, phone, step.notification, closed_details(record, keys_deleted))
        return LogoutResult(keys_deleted, steps, timings)

    async def _enqueue(
        self, conn: Connection, phone: PhoneRef, notification: Notification | None, details: dict[str, Any]
    ) -> None:
        if notification is None:
            return
        await conn.execute(
            self._sql.enqueue,
            notification.notification_id,
            str(notification.event),
            phone.organization_id,
            phone.organization_phone_id,
            notification.occurred_at,
            json.dumps(notification.stats),
            notification.reason,
            json.dumps(details),
            notification.trace_id,
        )

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
