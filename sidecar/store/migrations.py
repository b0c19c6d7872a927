"""The sidecar's own tables, in their own schema (default wa_sidecar). `wa-sidecar migrate` applies them."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from sidecar.store.sqlnames import quote_identifier


@dataclass(frozen=True)
class Migration:
    """One schema change. Migrations are written expand-then-contract, because `helm upgrade` migrates first
    and then rolls the replicas: for a while the previous release serves on the new schema. An expand step
    (a new table, a new nullable column, a new index) keeps `serves_from` at the previous step's, so the release
    before it goes on deciding correctly; a contract step (a drop, a rename, a new constraint) raises it to its
    own number, and waits for a release after the last one that used what it removes. A release that knows
    fewer migrations than a database's highest `serves_from` does not serve on it."""

    sql: str
    serves_from: int


# Each entry is applied once, in order, inside one transaction; {schema} is the quoted schema name.
_HISTORY: tuple[str, ...] = (
    """
    CREATE TABLE {schema}.session_counters (
        organization_phone_id BIGINT PRIMARY KEY,
        organization_id       BIGINT NOT NULL,
        phone_user            TEXT,
        bad_mac_errors        INTEGER NOT NULL DEFAULT 0 CHECK (bad_mac_errors >= 0),
        bad_decrypt_errors    INTEGER NOT NULL DEFAULT 0 CHECK (bad_decrypt_errors >= 0),
        closed_at             TIMESTAMPTZ,
        updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE {schema}.closures (
        closure_id            TEXT PRIMARY KEY,
        organization_id       BIGINT NOT NULL,
        organization_phone_id BIGINT NOT NULL,
        reason                TEXT NOT NULL,
        trigger               TEXT NOT NULL,
        detail                TEXT NOT NULL,
        bad_mac_errors        INTEGER NOT NULL,
        bad_decrypt_errors    INTEGER NOT NULL,
        socket                TEXT NOT NULL,
        keys_deleted          INTEGER,
        steps                 JSONB NOT NULL,
        started_at            TIMESTAMPTZ NOT NULL,
        duration_seconds      DOUBLE PRECISION,
        recorded_at           TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX closures_phone_idx ON {schema}.closures (organization_phone_id, started_at DESC);
    CREATE INDEX closures_started_idx ON {schema}.closures (started_at);
    -- The last journal position each sidecar instance applied: replays after a crash skip what is here.
    CREATE TABLE {schema}.journal_positions (
        instance_id TEXT PRIMARY KEY,
        position    BIGINT NOT NULL
    );
    """,
    """
    -- Owner notifications, written in the same transaction as the change that caused them (durable outbox).
    CREATE TABLE {schema}.outbox (
        seq                   BIGSERIAL UNIQUE,
        notification_id       TEXT PRIMARY KEY,
        event                 TEXT NOT NULL,
        organization_id       BIGINT NOT NULL,
        organization_phone_id BIGINT NOT NULL,
        occurred_at           TIMESTAMPTZ NOT NULL,
        stats                 JSONB NOT NULL,
        reason                TEXT,
        details               JSONB NOT NULL DEFAULT '{{}}',
        trace_id              TEXT,
        status                TEXT NOT NULL DEFAULT 'pending',
        attempts              INTEGER NOT NULL DEFAULT 0,
        next_attempt_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
        last_error            TEXT,
        team                  TEXT,
        delivered_at          TIMESTAMPTZ
    );
    CREATE INDEX outbox_due_idx ON {schema}.outbox (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX outbox_phone_idx ON {schema}.outbox (organization_phone_id, seq) WHERE status = 'pending';
    CREATE INDEX outbox_status_idx ON {schema}.outbox (status, seq);
    """,
    """
    -- Safety decisions (circuit breaker, held sessions, incidents) beside the closures: the closure log.
    CREATE TABLE {schema}.decisions (
        decision_id           TEXT PRIMARY KEY,
        decision              TEXT NOT NULL,
        decided_at            TIMESTAMPTZ NOT NULL,
        organization_id       BIGINT,
        organization_phone_id BIGINT,
        detail                JSONB NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX decisions_decided_idx ON {schema}.decisions (decided_at);
    """,
    """
    -- Fleet mode: the decision state every replica reads and writes in one transaction per decision.
    -- phase: active, held, closing, closed. generation: bumped by each close claim (fencing); a close's
    -- database half applies only while the row still carries its generation.
    ALTER TABLE {schema}.session_counters
        ADD COLUMN phase               TEXT NOT NULL DEFAULT 'active',
        ADD COLUMN generation          BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN recent              JSONB,
        ADD COLUMN logged_out_observed BOOLEAN NOT NULL DEFAULT false,
        ADD COLUMN close_claimed_by    TEXT,
        ADD COLUMN close_lease_until   TIMESTAMPTZ,
        -- The claimed close itself, so that another replica can finish it once its lease has expired.
        ADD COLUMN close_reason        TEXT,
        ADD COLUMN close_trigger       TEXT,
        ADD COLUMN close_detail        TEXT,
        ADD COLUMN close_bad_mac       INTEGER,
        ADD COLUMN close_bad_decrypt   INTEGER,
        -- Reconnect-loop and conflict detection, shared: recent closes and when each incident was reported.
        ADD COLUMN loops               JSONB;
    UPDATE {schema}.session_counters SET phase = 'closed' WHERE closed_at IS NOT NULL;
    CREATE INDEX session_counters_phase_idx ON {schema}.session_counters (phase) WHERE phase <> 'closed';
    -- One row: the fleet's mode and circuit breaker, shared by every replica.
    CREATE TABLE {schema}.fleet_settings (
        singleton             BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
        mode                  TEXT NOT NULL DEFAULT 'enforce',
        observe_organizations BIGINT[] NOT NULL DEFAULT '{{}}',
        breaker_tripped_at    DOUBLE PRECISION,
        breaker_kept_by       TEXT,
        -- The flags the mode was last seeded from: a replica whose flags differ (a new deployment config)
        -- applies them; one with the same flags keeps what an operator set through the API since.
        configured_mode       TEXT,
        configured_observe    BIGINT[],
        changed_at            TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    -- Every automatic logout the breaker admitted, fleet-wide; rows older than the window are pruned.
    CREATE TABLE {schema}.breaker_ledger (
        seq                   BIGSERIAL PRIMARY KEY,
        closed_at             DOUBLE PRECISION NOT NULL,
        organization_phone_id BIGINT NOT NULL
    );
    CREATE INDEX breaker_ledger_closed_idx ON {schema}.breaker_ledger (closed_at);
    -- Which replica's runtime connection holds each phone's socket: a lease renewed by a heartbeat.
    CREATE TABLE {schema}.socket_owners (
        organization_phone_id BIGINT PRIMARY KEY,
        instance              TEXT NOT NULL,
        connection_id         BIGINT NOT NULL,
        generation            BIGINT NOT NULL DEFAULT 1,
        lease_until           TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX socket_owners_instance_idx ON {schema}.socket_owners (instance);
    -- Commands decided on one replica for a socket another replica holds; the owner delivers and answers.
    CREATE TABLE {schema}.socket_commands (
        command_id            TEXT PRIMARY KEY,
        organization_phone_id BIGINT NOT NULL,
        instance              TEXT NOT NULL,
        body                  JSONB NOT NULL,
        status                TEXT NOT NULL DEFAULT 'pending',
        error                 TEXT,
        created_at            TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX socket_commands_pending_idx ON {schema}.socket_commands (instance) WHERE status = 'pending';
    """,
    # 5: the fleet breaker counts admitted closes per second of its window (cheap at any close rate).
    """
    CREATE TABLE {schema}.breaker_buckets (
        second                BIGINT PRIMARY KEY,
        closes                INTEGER NOT NULL
    );
    INSERT INTO {schema}.breaker_buckets (second, closes)
        SELECT floor(closed_at)::bigint, count(*) FROM {schema}.breaker_ledger GROUP BY 1;
    DROP TABLE {schema}.breaker_ledger;
    """,
)
# Migrations 1-5 predate the rule: each is taken to need the release that brought it.
MIGRATIONS: tuple[Migration, ...] = (
    *(Migration(sql, number) for number, sql in enumerate(_HISTORY, start=1)),
    # 6 (expand): the undecided-events journal's positions decided out of order (events of a phone whose row
    # was locked elsewhere wait and are decided later); releases with 5 migrations ignore the column.
    Migration("ALTER TABLE {schema}.journal_positions ADD COLUMN undecided BIGINT[];", 5),
    # 7 (expand): each runtime id's last acknowledged event seq on the runtime link, shared by the replicas; the
    # Idempotency-Key answers of POST /v1/events; an index for the session.end commands owed to absent runtimes.
    Migration(
        """
        CREATE TABLE {schema}.link_sequences (
            runtime_id  TEXT PRIMARY KEY,
            acked       BIGINT NOT NULL,
            updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        -- POST /v1/events Idempotency-Key: the first answer of each key, for a day.
        CREATE TABLE {schema}.idempotency_keys (
            key         TEXT PRIMARY KEY,
            digest      TEXT NOT NULL,
            status      INTEGER,
            answer      JSONB,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        -- session.end commands owed to a runtime that was away when its phone was closed.
        CREATE INDEX socket_commands_owed_idx ON {schema}.socket_commands (organization_phone_id)
            WHERE status = 'owed';
        """,
        5,
    ),
    # 8 (expand): what a runtime said it deleted when it acked a routed command (--key-store runtime); releases
    # with 5 to 7 migrations neither write nor read it.
    Migration("ALTER TABLE {schema}.socket_commands ADD COLUMN keys_deleted INTEGER;", 5),
    # 9 (expand): leases per replica. A replica's heartbeat renews its one row (and says how many sessions it
    # holds: the breaker's denominator, O(replicas) to read); a phone's socket_owners row is written only when it
    # is claimed, released or taken over. Releases with 5 to 8 migrations renew their rows' own lease_until,
    # which this release still honours; the instance index was used by no query (every lookup is by phone).
    Migration(
        """
        CREATE TABLE {schema}.replica_leases (
            instance    TEXT PRIMARY KEY,
            lease_until TIMESTAMPTZ NOT NULL,
            sessions    INTEGER NOT NULL DEFAULT 0
        );
        DROP INDEX IF EXISTS {schema}.socket_owners_instance_idx;
        """,
        5,
    ),
    # 10 (expand): the restriction timeline of every number (`account.restriction`): what is in force, and the
    # history of changes (pruned by --retention). Releases with 5 to 9 migrations neither write nor read them.
    Migration(
        """
        CREATE TABLE {schema}.restrictions (
            organization_phone_id BIGINT NOT NULL,
            kind                  TEXT NOT NULL,
            organization_id       BIGINT NOT NULL,
            since                 TIMESTAMPTZ NOT NULL,
            until                 TIMESTAMPTZ,
            code                  INTEGER,
            detail                TEXT,
            updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (organization_phone_id, kind)
        );
        CREATE TABLE {schema}.restriction_history (
            seq                   BIGSERIAL PRIMARY KEY,
            organization_id       BIGINT NOT NULL,
            organization_phone_id BIGINT NOT NULL,
            kind                  TEXT NOT NULL,
            active                BOOLEAN NOT NULL,
            at                    TIMESTAMPTZ NOT NULL,
            until                 TIMESTAMPTZ,
            code                  INTEGER,
            detail                TEXT,
            recorded_at           TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX restriction_history_phone_idx ON {schema}.restriction_history (organization_phone_id, seq DESC);
        CREATE INDEX restriction_history_recorded_idx ON {schema}.restriction_history (recorded_at);
        """,
        5,
    ),
    # 11 (expand): the loss ledger: failed messages every replica sees until they are recovered or settled lost
    # (store/loss_ledger.py). Releases with 5 to 10 migrations neither write nor read it.
    Migration(
        """
        CREATE TABLE {schema}.message_failures (
            organization_phone_id BIGINT NOT NULL,
            message_id            TEXT NOT NULL,
            organization_id       BIGINT NOT NULL,
            peer_user             TEXT,
            deferred              BOOLEAN NOT NULL DEFAULT false,
            recovered             BOOLEAN NOT NULL DEFAULT false,
            settled               BOOLEAN NOT NULL DEFAULT false,
            deadline              TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (organization_phone_id, message_id)
        );
        CREATE INDEX message_failures_deadline_idx ON {schema}.message_failures (deadline);
        """,
        5,
    ),
)


async def migrate(connection: asyncpg.Connection, schema: str) -> list[int]:
    """Apply the migrations not applied yet; returns their numbers. Safe to run from several replicas."""
    quoted = quote_identifier(schema)
    applied_now: list[int] = []
    async with connection.transaction():
        # One migrator at a time across replicas and Helm hook retries.
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"wa-sidecar-migrate:{schema}")
        await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        # Which release each migration needs (NULL, as releases before this column write: its own number).
        await connection.execute(f"ALTER TABLE {quoted}.schema_migrations ADD COLUMN IF NOT EXISTS serves_from INTEGER")
        done = {row["version"] for row in await connection.fetch(f"SELECT version FROM {quoted}.schema_migrations")}
        for number, migration in enumerate(MIGRATIONS, start=1):
            if number in done:
                continue
            await connection.execute(migration.sql.format(schema=quoted))
            await connection.execute(
                f"INSERT INTO {quoted}.schema_migrations (version, serves_from) VALUES ($1, $2)",
                number,
                migration.serves_from,
            )
            applied_now.append(number)
    return applied_now
