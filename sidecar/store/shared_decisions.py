"""Fleet mode: the decision state every replica shares, in PostgreSQL (ports.FleetState).

Each decision is one transaction: the phone's row is upserted and locked (`INSERT … ON CONFLICT DO UPDATE`
takes the row lock), the rules decide on the values the database returned, and the new state is written back
before the commit; so increments are never lost or doubled across replicas, and exactly one replica claims a
close (the claim bumps the row's generation, which fences a stale close's database half). The breaker's
admission runs in the same transaction under a transaction-scoped advisory lock over the shared ledger; no
session-scoped lock is taken anywhere, so PgBouncer in transaction mode works.

About 380 lines because every fleet statement is built here once from the validated schema name, beside the
batch that uses them; splitting them would scatter the quoting as it would in postgres.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from sidecar.ports import ClaimedClose, FleetSettings, JournalProgress, StoredDecision
from sidecar.rules.policy import Close, CloseReason, Counters, Phase, Recent, SessionState
from sidecar.rules.records import CloseTrigger, Notification, PhoneRef
from sidecar.rules.safety import BreakerConfig, BreakerStatus, IncidentKind, LoopState, Mode
from sidecar.store.postgres import BREAKER_LOCK_WAIT, PostgresStore
from sidecar.store.sqlnames import quote_identifier
from sidecar.store.statements import Connection

LIVE_COUNT_SECONDS = 5.0
CLOSE_LEASE_SECONDS = 60.0  # a claimed close not finished by then is taken over by another replica
# A wait for the breaker's lock that timed out (store/postgres.py BREAKER_LOCK_WAIT) means a session stuck holding
# it (a replica cut off mid-transaction): for this long after one, the lock is only tried, not waited for.
LOCK_PATIENCE_SECONDS = 2.0


def _recent_to_json(recent: Recent) -> str | None:
    if not recent.bad_mac and not recent.bad_decrypt:
        return None
    return json.dumps({"mac": [list(item) for item in recent.bad_mac], "decrypt": list(recent.bad_decrypt)})


def _recent_from_json(raw: str | None) -> Recent:
    if not raw:
        return Recent()
    data = json.loads(raw)
    return Recent(tuple((float(at), peer) for at, peer in data["mac"]), tuple(float(at) for at in data["decrypt"]))


def _loops_to_json(loops: LoopState) -> str:
    closes, reported = [list(item) for item in loops.closes], [list(item) for item in loops.reported]
    return json.dumps({"closes": closes, "reported": reported})


def _loops_from_json(raw: str | None) -> LoopState:
    if not raw:
        return LoopState()
    data = json.loads(raw)
    return LoopState(
        tuple((float(at), code) for at, code in data["closes"]),
        tuple((IncidentKind(kind), float(at)) for kind, at in data["reported"]),
    )


@dataclass
class _Admissions:
    """The breaker's ledger as one batch sees it under the fleet-wide lock: read once, the closes it admits counted
    here and written at the batch's commit (one lock, one read and one write per batch, not per close)."""

    tripped: bool
    in_window: int
    allowed: int
    admitted: int = 0

    def admit(self) -> tuple[bool, bool]:
        """(admitted, just tripped), as the one-replica breaker answers."""
        if self.tripped:
            return False, False
        if self.in_window + self.admitted + 1 > self.allowed:
            self.tripped = True
            return False, True
        self.admitted += 1
        return True, False


def _decision_of(row: asyncpg.Record) -> StoredDecision:
    state = SessionState(
        Counters(row["bad_mac_errors"], row["bad_decrypt_errors"]),
        Phase(row["phase"]),
        _recent_from_json(row["recent"]),
    )
    phone = PhoneRef(row["organization_id"], row["organization_phone_id"], row["phone_user"])
    loops = _loops_from_json(row["loops"]) if "loops" in row else LoopState()
    return StoredDecision(state, row["generation"], row["closed_epoch"], row["logged_out_observed"], phone, loops)


class _Batch:
    """The locked rows of one batch of decisions; saved states are written once per phone at commit."""

    def __init__(
        self,
        fleet: PostgresFleet,
        conn: Connection,
        rows: list[asyncpg.Record],
        busy: frozenset[int],
        journal: asyncpg.Record | None,
    ) -> None:
        self._fleet, self._conn = fleet, conn
        self.busy = busy
        self._stored = {row["organization_phone_id"]: _decision_of(row) for row in rows}
        self.high: int = journal["position"] if journal is not None else 0
        self._undecided = frozenset(journal["undecided"] or ()) if journal is not None else frozenset()
        self.positions: frozenset[int] = frozenset()
        self.sequences: dict[str, int] = {}
        self._users: dict[int, str] = {}
        self._saved: dict[int, SessionState] = {}
        self._claims: dict[int, int] = {}
        self._closes: dict[int, tuple[Close, CloseTrigger]] = {}
        self._loops: dict[int, LoopState] = {}
        self._notifications: list[tuple[PhoneRef, Notification]] = []
        self._admissions: _Admissions | None = None
        self._lock_refused = False

    def already_decided(self, position: int) -> bool:
        return position <= self.high and position not in self._undecided

    def decided(self, positions: frozenset[int]) -> None:
        self.positions = positions

    def taken(self, sequences: dict[str, int]) -> None:
        self.sequences = sequences

    def stored(self, organization_phone_id: int) -> StoredDecision:
        return self._stored[organization_phone_id]

    async def admit_automatic_close(self, phone: PhoneRef) -> tuple[bool, bool] | None:
        if self._admissions is None:
            if self._lock_refused:  # held elsewhere a moment ago: this batch's other closes are retried too
                return None
            self._admissions = await self._fleet.admissions(self._conn)
            if self._admissions is None:
                self._lock_refused = True
                return None
        admitted, just_tripped = self._admissions.admit()
        if just_tripped:
            await self._conn.execute(self._fleet.sql_trip, None)
        return admitted, just_tripped

    def save(
        self,
        phone: PhoneRef,
        state: SessionState,
        notification: Notification | None,
        close: tuple[Close, CloseTrigger] | None,
    ) -> int:
        phone_id = phone.organization_phone_id
        self._saved[phone_id] = state
        if phone.phone_user:
            self._users[phone_id] = phone.phone_user
        if close is not None:
            self._claims[phone_id] = self._claims.get(phone_id, 0) + 1
            self._closes[phone_id] = close
        if notification is not None:
            self._notifications.append((phone, notification))
        return self._stored[phone_id].generation + self._claims.get(phone_id, 0)

    def save_loops(self, phone: PhoneRef, loops: LoopState) -> None:
        self._loops[phone.organization_phone_id] = loops

    async def flush(self) -> None:
        if self._admissions is not None and self._admissions.admitted:
            await self._conn.execute(self._fleet.sql_admit, self._admissions.admitted)
        if self._loops:
            await self._conn.execute(
                self._fleet.sql_save_loops,
                list(self._loops),
                [_loops_to_json(loops) for loops in self._loops.values()],
            )
        if self._saved:
            ids = list(self._saved)
            states = [self._saved[phone_id] for phone_id in ids]
            await self._conn.execute(
                self._fleet.sql_save,
                ids,
                [state.counters.bad_mac_errors for state in states],
                [state.counters.bad_decrypt_errors for state in states],
                [str(state.phase) for state in states],
                [_recent_to_json(state.recent) for state in states],
                [self._claims.get(phone_id, 0) for phone_id in ids],
                self._fleet.instance,
                self._fleet.close_lease_seconds,
                [str(self._closes[i][0].reason) if i in self._closes else None for i in ids],
                [str(self._closes[i][1]) if i in self._closes else None for i in ids],
                [self._closes[i][0].detail if i in self._closes else None for i in ids],
                [self._closes[i][0].counters.bad_mac_errors if i in self._closes else None for i in ids],
                [self._closes[i][0].counters.bad_decrypt_errors if i in self._closes else None for i in ids],
                [self._users.get(phone_id) for phone_id in ids],
            )
        await self._fleet.store.enqueue_many(self._conn, self._notifications)


class PostgresFleet:
    def __init__(
        self,
        store: PostgresStore,
        breaker: BreakerConfig,
        instance: str,
        close_lease_seconds: float = CLOSE_LEASE_SECONDS,
    ) -> None:
        self.store = store
        self.instance = instance
        self.close_lease_seconds = close_lease_seconds
        self._breaker = breaker
        self._live: tuple[float, int] | None = None  # (monotonic time read, live sessions): see _live_sessions
        self._impatient_until = 0.0  # monotonic: until then the breaker's lock is only tried (LOCK_PATIENCE_SECONDS)
        s = quote_identifier(store.schema)
        counters, ledger, settings = f"{s}.session_counters", f"{s}.breaker_buckets", f"{s}.fleet_settings"
        self._lock_key = f"wa-sidecar-breaker:{store.schema}"
        columns = (
            "bad_mac_errors, bad_decrypt_errors, phase, generation, recent::text AS recent, "
            "extract(epoch FROM closed_at)::float8 AS closed_epoch, logged_out_observed, "
            "organization_id, organization_phone_id, c.phone_user, loops::text AS loops"
        )
        returning = f"RETURNING {columns}"
        # A batch locks the rows that are free and skips those another session holds (a replica cut off mid-
        # transaction, or one deciding the same phone now): their events wait, unrelated phones do not.
        self.sql_lock_free = (
            f"SELECT {columns} FROM {counters} AS c WHERE organization_phone_id = ANY($1::bigint[]) "
            "ORDER BY organization_phone_id FOR UPDATE SKIP LOCKED"
        )
        self.sql_existing = (
            f"SELECT organization_phone_id FROM {counters} WHERE organization_phone_id = ANY($1::bigint[])"
        )
        # New phones' rows, created and locked (and any row, waiting, for an operator's close). Rows are locked
        # in id order, so concurrent batches of different replicas cannot deadlock.
        self.sql_lock = (
            f"INSERT INTO {counters} AS c (organization_phone_id, organization_id, phone_user) "
            "SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[]) ORDER BY 1 "
            "ON CONFLICT (organization_phone_id) DO UPDATE SET "
            f"phone_user = COALESCE(EXCLUDED.phone_user, c.phone_user) {returning}"
        )
        self.sql_save = (
            f"UPDATE {counters} AS c SET bad_mac_errors = u.mac, bad_decrypt_errors = u.dec, phase = u.phase, "
            "recent = u.recent::jsonb, generation = c.generation + u.claims, "
            "closed_at = CASE WHEN u.phase = 'closed' THEN c.closed_at END, "
            "close_claimed_by = CASE WHEN u.claims > 0 THEN $7 WHEN u.phase = 'closing' THEN c.close_claimed_by END, "
            "close_lease_until = CASE WHEN u.claims > 0 THEN now() + make_interval(secs => $8) "
            "WHEN u.phase = 'closing' THEN c.close_lease_until END, "
            "close_reason = CASE WHEN u.claims > 0 THEN u.reason WHEN u.phase = 'closing' THEN c.close_reason END, "
            "close_trigger = CASE WHEN u.claims > 0 THEN u.trig WHEN u.phase = 'closing' THEN c.close_trigger END, "
            "close_detail = CASE WHEN u.claims > 0 THEN u.detail WHEN u.phase = 'closing' THEN c.close_detail END, "
            "close_bad_mac = CASE WHEN u.claims > 0 THEN u.cmac WHEN u.phase = 'closing' THEN c.close_bad_mac END, "
            "close_bad_decrypt = CASE WHEN u.claims > 0 THEN u.cdec "
            "WHEN u.phase = 'closing' THEN c.close_bad_decrypt END, phone_user = COALESCE(u.usr, c.phone_user), "
            "updated_at = now() "
            "FROM unnest($1::bigint[], $2::int[], $3::int[], $4::text[], $5::text[], $6::int[], $9::text[], "
            "$10::text[], $11::text[], $12::int[], $13::int[], $14::text[]) "
            "AS u(id, mac, dec, phase, recent, claims, reason, trig, detail, cmac, cdec, usr) "
            "WHERE c.organization_phone_id = u.id"
        )
        self.sql_save_loops = (
            f"UPDATE {counters} AS c SET loops = u.loops::jsonb FROM unnest($1::bigint[], $2::text[]) "
            "AS u(id, loops) WHERE c.organization_phone_id = u.id"
        )
        self.sql_stored = (
            "SELECT bad_mac_errors, bad_decrypt_errors, phase, generation, recent::text AS recent, "
            "extract(epoch FROM closed_at)::float8 AS closed_epoch, logged_out_observed, "
            f"organization_id, organization_phone_id, phone_user FROM {counters} WHERE organization_phone_id = $1"
        )
        self.sql_ensure_settings = f"INSERT INTO {settings} (singleton) VALUES (true) ON CONFLICT DO NOTHING"
        self.sql_seed_settings = (
            f"INSERT INTO {settings} AS f (singleton, mode, observe_organizations, configured_mode, "
            "configured_observe) VALUES (true, $1, $2, $1, $2) ON CONFLICT (singleton) DO UPDATE SET "
            "mode = EXCLUDED.mode, observe_organizations = EXCLUDED.observe_organizations, "
            "configured_mode = EXCLUDED.configured_mode, configured_observe = EXCLUDED.configured_observe, "
            "changed_at = now() WHERE f.configured_mode IS DISTINCT FROM EXCLUDED.configured_mode "
            "OR f.configured_observe IS DISTINCT FROM EXCLUDED.configured_observe"
        )
        self.sql_settings = f"SELECT mode, observe_organizations, breaker_tripped_at, breaker_kept_by FROM {settings}"
        self.sql_set_mode = f"UPDATE {settings} SET mode = $1, observe_organizations = $2, changed_at = now()"
        # Every time the replicas compare is the database's (now(): the deciding transaction's start), never a
        # replica's clock: a replica whose clock is off cannot prune the others' buckets or stretch the window.
        epoch = "extract(epoch FROM now())::float8"
        self.sql_trip = (
            f"UPDATE {settings} SET breaker_tripped_at = COALESCE(breaker_tripped_at, {epoch}), "
            "breaker_kept_by = COALESCE($1, breaker_kept_by), changed_at = now() "
            f"RETURNING breaker_tripped_at = {epoch} AS fresh"
        )
        self.sql_keep = (
            f"UPDATE {settings} SET breaker_kept_by = $1, changed_at = now() WHERE breaker_tripped_at IS NOT NULL"
        )
        self.sql_release = (
            f"UPDATE {settings} SET breaker_tripped_at = NULL, breaker_kept_by = NULL, changed_at = now()"
        )
        self.sql_clear_ledger = f"DELETE FROM {ledger}"
        # Admitted closes counted per second of the window: O(window seconds) per admission, not O(closes),
        # as the one-replica breaker counts them. $1: the window (seconds).
        start = f"floor({epoch} - $1::float8)::bigint"
        self.sql_prune = f"DELETE FROM {ledger} WHERE second <= {start}"
        self.sql_in_window = f"SELECT COALESCE(sum(closes), 0) FROM {ledger} WHERE second > {start}"
        self.sql_admit = (
            f"INSERT INTO {ledger} AS b (second, closes) VALUES (floor({epoch})::bigint, $1) "
            "ON CONFLICT (second) DO UPDATE SET closes = b.closes + EXCLUDED.closes"
        )
        self.sql_try_lock = "SELECT pg_try_advisory_xact_lock(hashtext($1))"
        # Waited for at most BREAKER_LOCK_WAIT (in a savepoint: a wait that times out leaves the batch usable);
        # the transaction's own lock_timeout is put back once the lock is held.
        self.sql_wait_lock = (
            "SELECT current_setting('lock_timeout') AS kept, set_config('lock_timeout', $2, true), "
            "pg_advisory_xact_lock(hashtext($1))"
        )
        self.sql_journal = f"SELECT position, undecided FROM {s}.journal_positions WHERE instance_id = $1"
        # Runtime link frames decided here: a replica the runtime resends them to skips them (link/sequences.py).
        self.sql_taken = (
            f"INSERT INTO {s}.link_sequences AS l (runtime_id, acked) SELECT * FROM unnest($1::text[], $2::bigint[]) "
            "ON CONFLICT (runtime_id) DO UPDATE SET acked = GREATEST(l.acked, EXCLUDED.acked), updated_at = now()"
        )
        self.sql_set_journal = (
            f"INSERT INTO {s}.journal_positions AS j (instance_id, position, undecided) VALUES ($1, $2, $3) "
            "ON CONFLICT (instance_id) DO UPDATE SET position = GREATEST(j.position, EXCLUDED.position), "
            "undecided = EXCLUDED.undecided"
        )
        # The sessions the live replicas hold (each says at its heartbeat): O(replicas), not O(fleet).
        self.sql_live = f"SELECT COALESCE(sum(sessions), 0) FROM {s}.replica_leases WHERE lease_until >= now()"
        self.sql_held = f"SELECT count(*) FROM {counters} WHERE phase = 'held'"
        self.sql_take_over = (
            f"UPDATE {counters} AS c SET generation = c.generation + 1, close_claimed_by = $1, "
            "close_lease_until = now() + make_interval(secs => $2), updated_at = now() "
            f"WHERE c.organization_phone_id IN (SELECT organization_phone_id FROM {counters} "
            "WHERE phase = 'closing' AND close_lease_until < now() ORDER BY 1 LIMIT $3 FOR UPDATE SKIP LOCKED) "
            "RETURNING c.organization_id, c.organization_phone_id, c.phone_user, c.generation, c.close_reason, "
            "c.close_trigger, c.close_detail, c.close_bad_mac, c.close_bad_decrypt"
        )
        # A row a batch holds right now is skipped, not waited for: renewed on the next round, long before its
        # close lease could run out.
        self.sql_renew_closes = (
            f"UPDATE {counters} SET close_lease_until = now() + make_interval(secs => $3) "
            f"WHERE organization_phone_id IN (SELECT organization_phone_id FROM {counters} WHERE close_claimed_by = $1 "
            "AND phase = 'closing' AND organization_phone_id = ANY($2::bigint[]) FOR UPDATE SKIP LOCKED)"
        )
        self.sql_release_close = (
            f"UPDATE {counters} SET phase = 'active', closed_at = NULL, close_claimed_by = NULL, "
            "close_lease_until = NULL, close_reason = NULL, close_trigger = NULL, close_detail = NULL, "
            "updated_at = now() WHERE organization_phone_id = $1 AND generation = $2 AND phase IN ('closing', 'closed')"
        )
        self.sql_held_phones = (
            f"SELECT organization_id, organization_phone_id, phone_user FROM {counters} WHERE phase = 'held' "
            "ORDER BY organization_phone_id"
        )

    async def seed_settings(self, mode: Mode, observe_organizations: frozenset[int]) -> None:
        """Seed the fleet's mode from this replica's flags when they are new (the first replica, or a changed
        deployment config); flags the fleet has already seen leave an operator's later change alone."""
        async with self.store.connection() as conn:
            await conn.execute(self.sql_seed_settings, str(mode), sorted(observe_organizations))

    @asynccontextmanager
    async def deciding(
        self, phones: Sequence[PhoneRef], journal: JournalProgress | None, wait: bool = False
    ) -> AsyncIterator[_Batch]:
        unique: dict[int, PhoneRef] = {}
        for phone in phones:
            known = unique.get(phone.organization_phone_id)
            if known is None or (known.phone_user is None and phone.phone_user):
                unique[phone.organization_phone_id] = phone
        async with self.store.transaction() as conn:
            rows: list[asyncpg.Record] = []
            fresh = list(unique)
            busy: frozenset[int] = frozenset()
            if not wait:
                rows = await conn.fetch(self.sql_lock_free, fresh)
                if len(rows) < len(unique):
                    locked = {row["organization_phone_id"] for row in rows}
                    missing = [phone_id for phone_id in unique if phone_id not in locked]
                    held = {row["organization_phone_id"] for row in await conn.fetch(self.sql_existing, missing)}
                    busy = frozenset(held)
                    fresh = [phone_id for phone_id in missing if phone_id not in held]
                else:
                    fresh = []
            if fresh:
                rows += await conn.fetch(
                    self.sql_lock,
                    fresh,
                    [unique[phone_id].organization_id for phone_id in fresh],
                    [unique[phone_id].phone_user for phone_id in fresh],
                )
            stored = await conn.fetchrow(self.sql_journal, journal.instance_id) if journal is not None else None
            batch = _Batch(self, conn, rows, busy, stored)
            yield batch
            await batch.flush()
            if journal is not None and batch.positions:
                high = max(batch.high, *batch.positions)
                undecided = journal.undecided_below(high, batch.positions)
                await conn.execute(self.sql_set_journal, journal.instance_id, high, undecided)
            if batch.sequences:
                keys = sorted(batch.sequences)
                await conn.execute(self.sql_taken, keys, [batch.sequences[key] for key in keys])

    async def admissions(self, conn: Connection) -> _Admissions | None:
        """The breaker's ledger under its fleet-wide lock, for one batch's closes; None when another session holds
        the lock past BREAKER_LOCK_WAIT (a replica cut off mid-transaction holds it until the server ends that
        session): the batch's closes are retried, its other decisions are not held up."""
        if not await self._lock(conn):
            return None
        settings = await conn.fetchrow(self.sql_settings)
        if settings is None:
            await conn.execute(self.sql_ensure_settings)
            settings = await conn.fetchrow(self.sql_settings)
        assert settings is not None
        window = self._breaker.window_seconds
        if settings["breaker_tripped_at"] is not None:
            return _Admissions(True, 0, 0)
        await conn.execute(self.sql_prune, window)
        in_window = int(await conn.fetchval(self.sql_in_window, window))
        return _Admissions(False, in_window, self._breaker.allowed(await self._live_sessions(conn)))

    async def _lock(self, conn: Connection) -> bool:
        if await conn.fetchval(self.sql_try_lock, self._lock_key):
            return True
        if time.monotonic() < self._impatient_until:
            return False
        try:
            async with conn.transaction():
                kept = await conn.fetchval(self.sql_wait_lock, self._lock_key, BREAKER_LOCK_WAIT)
        except asyncpg.LockNotAvailableError:
            self._impatient_until = time.monotonic() + LOCK_PATIENCE_SECONDS
            return False
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", kept)
        return True

    async def _live_sessions(self, conn: Connection) -> int:
        """The breaker's denominator: the sessions the live replicas' runtime connections hold, as each replica
        said at its last heartbeat (a sum over replica_leases, O(replicas)); read at most every
        LIVE_COUNT_SECONDS, since an admission holds the fleet-wide lock. A share-of-fleet threshold does not
        need it exact."""
        now = time.monotonic()
        if self._live is None or now - self._live[0] > LIVE_COUNT_SECONDS:
            self._live = (now, int(await conn.fetchval(self.sql_live)))
        return self._live[1]

    async def stored(self, organization_phone_id: int) -> StoredDecision | None:
        async with self.store.connection() as conn:
            row = await conn.fetchrow(self.sql_stored, organization_phone_id)
        return _decision_of(row) if row is not None else None

    async def settings(self) -> FleetSettings:
        async with self.store.connection() as conn:
            row = await conn.fetchrow(self.sql_settings)
            if row is None:
                await conn.execute(self.sql_ensure_settings)
                row = await conn.fetchrow(self.sql_settings)
        assert row is not None
        return FleetSettings(
            Mode(row["mode"]),
            frozenset(int(item) for item in row["observe_organizations"]),
            row["breaker_tripped_at"],
            row["breaker_kept_by"],
        )

    async def set_mode(self, mode: Mode, observe_organizations: frozenset[int]) -> None:
        async with self.store.transaction() as conn:
            await conn.execute(self.sql_ensure_settings)
            await conn.execute(self.sql_set_mode, str(mode), sorted(observe_organizations))

    async def trip_breaker(self, operator: str) -> bool:
        async with self.store.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._lock_key)
            await conn.execute(self.sql_ensure_settings)
            return bool(await conn.fetchval(self.sql_trip, operator))

    async def keep_breaker(self, operator: str) -> bool:
        async with self.store.connection() as conn:
            status: str = await conn.execute(self.sql_keep, operator)
        return status.split()[-1] != "0"

    async def release_breaker(self) -> None:
        async with self.store.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._lock_key)
            await conn.execute(self.sql_release)
            await conn.execute(self.sql_clear_ledger)

    async def breaker_status(self) -> BreakerStatus:
        async with self.store.transaction(isolation="repeatable_read", readonly=True) as conn:
            settings = await conn.fetchrow(self.sql_settings)
            in_window = int(await conn.fetchval(self.sql_in_window, self._breaker.window_seconds))
            live = await self._live_sessions(conn)
            held = int(await conn.fetchval(self.sql_held))
        tripped_at: float | None = settings["breaker_tripped_at"] if settings else None
        kept_by: str | None = settings["breaker_kept_by"] if settings else None
        return BreakerStatus(tripped_at is not None, tripped_at, in_window, self._breaker.allowed(live), held, kept_by)

    async def renew_closes(self, organization_phone_ids: Sequence[int]) -> None:
        async with self.store.connection() as conn:
            await conn.execute(
                self.sql_renew_closes, self.instance, list(organization_phone_ids), self.close_lease_seconds
            )

    async def release_close(self, organization_phone_id: int, generation: int) -> None:
        async with self.store.connection() as conn:
            await conn.execute(self.sql_release_close, organization_phone_id, generation)

    async def take_over_closes(self, limit: int) -> list[ClaimedClose]:
        async with self.store.connection() as conn:
            rows = await conn.fetch(self.sql_take_over, self.instance, self.close_lease_seconds, limit)
        return [
            ClaimedClose(
                PhoneRef(row["organization_id"], row["organization_phone_id"], row["phone_user"]),
                Close(
                    CloseReason(row["close_reason"] or CloseReason.FORCED),
                    row["close_detail"] or "finished by another replica after the first one stopped mid-close",
                    Counters(row["close_bad_mac"] or 0, row["close_bad_decrypt"] or 0),
                ),
                CloseTrigger(row["close_trigger"] or CloseTrigger.OPERATOR),
                row["generation"],
            )
            for row in rows
        ]

    async def held_phones(self) -> list[PhoneRef]:
        async with self.store.connection() as conn:
            rows = await conn.fetch(self.sql_held_phones)
        return [PhoneRef(row["organization_id"], row["organization_phone_id"], row["phone_user"]) for row in rows]


__all__ = ["CLOSE_LEASE_SECONDS", "PostgresFleet"]
