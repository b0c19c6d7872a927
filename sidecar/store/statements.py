"""Every statement of the PostgreSQL store, built once from the (validated) schema mapping: the seed schema's
tables and the sidecar's own, quoted in one place (store/sqlnames.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from sidecar.config import SchemaMapping
from sidecar.rules.records import CounterKind
from sidecar.store.sqlnames import quote_identifier as q
from sidecar.store.sqlnames import quote_qualified

Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching `prefix` literally ('_' and '%' are wildcards otherwise)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Statements:
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
        r, history = f"{s}.restrictions", f"{s}.restriction_history"
        entry = "organization_id, organization_phone_id, kind"
        self.restriction_lock = (
            f"SELECT since, until FROM {r} WHERE organization_phone_id = $1 AND kind = $2 FOR UPDATE"
        )
        self.restriction_upsert = (
            f"INSERT INTO {r} AS r (organization_phone_id, kind, organization_id, since, until, code, detail) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (organization_phone_id, kind) DO UPDATE SET "
            "since = CASE WHEN $8 THEN EXCLUDED.since ELSE r.since END, until = EXCLUDED.until, code = EXCLUDED.code, "
            "detail = EXCLUDED.detail, updated_at = now()"
        )
        self.restriction_lift = f"DELETE FROM {r} WHERE organization_phone_id = $1 AND kind = $2 RETURNING since"
        self.restriction_history = (
            f"INSERT INTO {history} ({entry}, active, at, until, code, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        )
        self.restrictions_all = (
            f"SELECT {entry}, true AS active, since AS at, until, code, detail, 0::bigint AS seq FROM {r}"
        )
        in_force = "(until IS NULL OR until > now())"
        self.restrictions_of = f"{self.restrictions_all} WHERE organization_phone_id = $1 AND {in_force} ORDER BY kind"
        self.restriction_history_of = (
            f"SELECT {entry}, active, at, until, code, detail, seq FROM {history} WHERE organization_phone_id = $1 "
            "ORDER BY seq DESC LIMIT $2"
        )
        self.restrictions_page = (
            f"{self.restrictions_all} WHERE {in_force} AND ($1::bigint IS NULL OR organization_id = $1) AND "
            "($2::text IS NULL OR kind = $2) AND "
            "($3::bigint IS NULL OR (organization_phone_id, kind) > ($3, $4::text)) "
            "ORDER BY organization_phone_id, kind LIMIT $5"
        )
        self.restriction_history_page = (
            f"SELECT {entry}, active, at, until, code, detail, seq FROM {history} WHERE "
            "($1::bigint IS NULL OR organization_id = $1) AND ($2::text IS NULL OR kind = $2) AND "
            "($3::bigint IS NULL OR seq < $3) ORDER BY seq DESC LIMIT $4"
        )
        # The loss ledger (store/loss_ledger.py): failed messages every replica sees, each settled exactly once.
        failures = f"{s}.message_failures"
        keys = "SELECT * FROM unnest($1::bigint[], $2::text[])"
        self.failures_share = (
            f"INSERT INTO {failures} (organization_phone_id, message_id, organization_id, peer_user, deferred, "
            "deadline) SELECT p, m, o, u, d, now() + make_interval(secs => $6) FROM unnest($1::bigint[], "
            "$2::text[], $3::bigint[], $4::text[], $5::boolean[]) AS f(p, m, o, u, d) "
            "ON CONFLICT (organization_phone_id, message_id) DO NOTHING"
        )
        self.failures_recovered = (
            f"INSERT INTO {failures} (organization_phone_id, message_id, organization_id, recovered, deadline) "
            "SELECT p, m, o, true, now() + make_interval(secs => $4) FROM unnest($1::bigint[], $2::text[], "
            "$3::bigint[]) AS f(p, m, o) ON CONFLICT (organization_phone_id, message_id) DO UPDATE SET recovered = true"
        )
        self.failures_settle = (
            f"UPDATE {failures} SET settled = true WHERE (organization_phone_id, message_id) IN ({keys}) "
            "AND NOT settled RETURNING organization_phone_id, message_id, recovered"
        )
        self.failures_orphaned = (
            f"UPDATE {failures} SET settled = true WHERE (organization_phone_id, message_id) IN (SELECT "
            f"organization_phone_id, message_id FROM {failures} WHERE NOT settled AND deadline < now() - "
            "make_interval(secs => $1) ORDER BY deadline LIMIT $2 FOR UPDATE SKIP LOCKED) "
            "RETURNING organization_phone_id, message_id, organization_id, peer_user, deferred, recovered"
        )
        self.failures_prune = (
            f"DELETE FROM {failures} WHERE (organization_phone_id, message_id) IN (SELECT organization_phone_id, "
            f"message_id FROM {failures} WHERE settled AND deadline < now() - make_interval(secs => $1) "
            "LIMIT $2 FOR UPDATE SKIP LOCKED)"
        )
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
            "restriction_history": f"DELETE FROM {history} WHERE seq IN (SELECT seq FROM {history} "
            "WHERE recorded_at < $1 LIMIT $2)",
            "idempotency_keys": f"DELETE FROM {s}.idempotency_keys WHERE key IN (SELECT key FROM "
            f"{s}.idempotency_keys WHERE created_at < $1 LIMIT $2)",
            "link_sequences": f"DELETE FROM {s}.link_sequences WHERE runtime_id IN (SELECT runtime_id FROM "
            f"{s}.link_sequences WHERE updated_at < $1 LIMIT $2)",
            # Rows whose replica is gone (its lease ended before the cutoff, or no lease row at all).
            "socket_owners": f"DELETE FROM {s}.socket_owners WHERE organization_phone_id IN (SELECT "
            f"organization_phone_id FROM {s}.socket_owners AS o WHERE lease_until < $1 AND NOT EXISTS (SELECT 1 "
            f"FROM {s}.replica_leases AS r WHERE r.instance = o.instance AND r.lease_until >= $1) "
            "LIMIT $2 FOR UPDATE SKIP LOCKED)",
            "replica_leases": f"DELETE FROM {s}.replica_leases WHERE instance IN (SELECT instance FROM "
            f"{s}.replica_leases WHERE lease_until < $1 LIMIT $2)",
        }
        self.insert_closure = (
            f"INSERT INTO {s}.closures (closure_id, organization_id, organization_phone_id, reason, trigger, "
            "detail, bad_mac_errors, bad_decrypt_errors, socket, keys_deleted, steps, started_at, duration_seconds) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, "
            "EXTRACT(EPOCH FROM clock_timestamp() - $12)) ON CONFLICT (closure_id) DO NOTHING"
        )
        # GET /v1/closures: every filter optional (NULL), newest first, a page after the (started_at, id) given.
        self.list_closures = (
            f"SELECT * FROM {s}.closures WHERE ($1::bigint IS NULL OR organization_id = $1) "
            "AND ($2::bigint IS NULL OR organization_phone_id = $2) AND ($3::text IS NULL OR reason = $3) "
            "AND ($4::timestamptz IS NULL OR started_at >= $4) AND ($5::timestamptz IS NULL OR started_at < $5) "
            "AND ($6::timestamptz IS NULL OR (started_at, closure_id) < ($6, $7::text)) "
            "ORDER BY started_at DESC, closure_id DESC LIMIT $8"
        )
        self.recent_closures = (
            f"SELECT * FROM {s}.closures WHERE organization_phone_id = $1 ORDER BY started_at DESC LIMIT $2"
        )
        self.journal_position = f"SELECT position FROM {s}.journal_positions WHERE instance_id = $1 FOR UPDATE"
        self.set_journal_position = (
            f"INSERT INTO {s}.journal_positions AS j (instance_id, position) VALUES ($1, $2) "
            "ON CONFLICT (instance_id) DO UPDATE SET position = GREATEST(j.position, EXCLUDED.position)"
        )
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


def deleted_rows(status: str) -> int:
    return int(status.split()[-1])
