"""What each database step writes, inside the transaction the store opened for its batch: counters, key
deletions, decision records, and a logout's parts (each in its own savepoint), with the outbox rows they cause."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from sidecar.rules.jid import bare_number
from sidecar.rules.records import (
    DeleteKeys,
    IncrementCounter,
    Logout,
    LogoutResult,
    Notification,
    PhoneRef,
    RecordDecision,
    RecordRestriction,
    ResetCounters,
    Step,
    StepOutcome,
    StepResult,
    closed_details,
    moment,
    restriction_details,
)
from sidecar.store.db_errors import Fault, classify
from sidecar.store.statements import Connection, Statements, deleted_rows, like_prefix

LOGOUT_PARTS = ("authKeys", "phoneStatus", "closureRecord", "counters")


class StepWriter:
    def __init__(self, sql: Statements, logged_out_status: str) -> None:
        self._sql = sql
        self._logged_out_status = logged_out_status

    async def apply(self, conn: Connection, step: Step) -> StepResult:
        sql = self._sql
        if isinstance(step, IncrementCounter):
            p = step.phone
            await conn.execute(sql.increment[step.kind], p.organization_phone_id, p.organization_id, p.phone_user)
            await self.enqueue(conn, p, step.notification, {})
            return None
        if isinstance(step, ResetCounters):
            p = step.phone
            await conn.execute(sql.set_counters, p.organization_phone_id, p.organization_id, p.phone_user, None, False)
            await self.enqueue(conn, p, step.notification, {})
            return None
        if isinstance(step, DeleteKeys):
            user = await self._bare_number(conn, step.phone)
            if user is None:
                return 0
            patterns = [like_prefix(prefix) for prefix in step.key_prefixes]
            if step.observe:
                return int(await conn.fetchval(sql.count_prefixed, step.phone.organization_id, user, patterns))
            status = await conn.execute(sql.delete_prefixed, step.phone.organization_id, user, patterns)
            return deleted_rows(status)
        if isinstance(step, RecordRestriction):
            return await self._restriction(conn, step)
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
            await self.enqueue(conn, phone or PhoneRef(0, 0), step.notification, step.detail)
            return None
        return await self._logout(conn, step)

    async def _restriction(self, conn: Connection, step: RecordRestriction) -> int:
        """News (1) is a restriction not in force before, or one held lifted; the phone's row is locked first, so
        two replicas recording the same restriction write one history row and one notification."""
        sql, phone, r = self._sql, step.phone, step.restriction
        key = (phone.organization_phone_id, str(r.kind))
        at, until = moment(r.at), moment(r.until)
        if r.active:
            before = await conn.fetchrow(sql.restriction_lock, *key)
            news = before is None or (before["until"] is not None and before["until"] <= at)
            await conn.execute(sql.restriction_upsert, *key, phone.organization_id, at, until, r.code, r.detail, news)
        else:
            news = await conn.fetchval(sql.restriction_lift, *key) is not None
        if news:
            await conn.execute(
                sql.restriction_history, phone.organization_id, *key, r.active, at, until, r.code, r.detail
            )
            await self.enqueue(conn, phone, step.notification, restriction_details(r))
        return int(news)

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
                parts = [name for name in LOGOUT_PARTS if not (step.keys_given and name == "authKeys")]
                return LogoutResult(record.keys_deleted if step.keys_given else None,
                                    {**steps, **dict.fromkeys(parts, fenced)}, {})  # fmt: skip
        user = await self._bare_number(conn, phone)
        if step.observe:
            steps["phoneStatus"] = f"{StepOutcome.SKIPPED}: observe mode"
        if step.keys_given:
            keys_deleted = record.keys_deleted  # deleted where they are (--key-store); the record says how it went
        elif step.observe:
            would = int(await conn.fetchval(sql.count_all, phone.organization_id, user)) if user else 0
            steps["authKeys"] = f"{StepOutcome.SKIPPED}: observe mode, would delete {would}"
        elif user is None:
            steps["authKeys"] = "skipped: phone not found"
        elif (status := await part("authKeys", sql.delete_all, phone.organization_id, user)) is not None:
            keys_deleted = deleted_rows(status)
        if not step.observe:
            status = await part(
                "phoneStatus", sql.mark_logged_out, phone.organization_phone_id, self._logged_out_status
            )
            if status is not None and deleted_rows(status) == 0:
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
        await self.enqueue(conn, phone, step.notification, closed_details(record, keys_deleted))
        return LogoutResult(keys_deleted, steps, timings)

    async def enqueue(
        self, conn: Connection, phone: PhoneRef, notification: Notification | None, details: dict[str, Any]
    ) -> None:
        if notification is None:
            return
        await conn.execute(self._sql.enqueue, *_outbox_row(phone, notification, details))

    async def enqueue_many(self, conn: Connection, items: Sequence[tuple[PhoneRef, Notification]]) -> None:
        """Notifications in the outbox inside the caller's transaction, in their order, pipelined (one round trip
        for a batch of decisions, not one per notification)."""
        if items:
            await conn.executemany(self._sql.enqueue, [_outbox_row(phone, item, {}) for phone, item in items])


def _outbox_row(phone: PhoneRef, notification: Notification, details: dict[str, Any]) -> tuple[object, ...]:
    return (
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
