"""The `Idempotency-Key` table of `POST /v1/events` (http/idempotency.py) in PostgreSQL: one row per key, claimed
before the body is applied and answered after, so any replica answers a retry as the first one did."""

from __future__ import annotations

import json

from sidecar.http.idempotency import (
    IDEMPOTENCY_WINDOW_SECONDS,
    IN_PROGRESS_SECONDS,
    Answered,
    KeyInProgress,
    KeyReused,
)
from sidecar.store.postgres import PostgresStore
from sidecar.store.sqlnames import quote_identifier


class PostgresIdempotencyKeys:
    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        table = f"{quote_identifier(store.schema)}.idempotency_keys"
        # A key is free when new, past the window, or claimed by a post that never finished (IN_PROGRESS_SECONDS).
        self._claim = (
            f"INSERT INTO {table} AS k (key, digest) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET digest = "
            "EXCLUDED.digest, status = NULL, answer = NULL, created_at = now() WHERE k.created_at < now() - "
            "make_interval(secs => $3) OR (k.status IS NULL AND k.created_at < now() - make_interval(secs => $4)) "
            "RETURNING key"
        )
        self._read = f"SELECT digest, status, answer::text AS answer FROM {table} WHERE key = $1"
        self._finish = f"UPDATE {table} SET status = $2, answer = $3::jsonb WHERE key = $1"
        self._abandon = f"DELETE FROM {table} WHERE key = $1 AND status IS NULL"

    async def begin(self, key: str, digest: str) -> Answered | None:
        async with self._store.transaction() as conn:
            claimed = await conn.fetchval(self._claim, key, digest, IDEMPOTENCY_WINDOW_SECONDS, IN_PROGRESS_SECONDS)
            if claimed is not None:
                return None
            row = await conn.fetchrow(self._read, key)
        if row is None:  # deleted in between (abandoned): the caller may retry
            raise KeyInProgress
        if row["digest"] != digest:
            raise KeyReused
        if row["status"] is None:
            raise KeyInProgress
        return Answered(int(row["status"]), json.loads(row["answer"]))

    async def finish(self, key: str, answer: Answered) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._finish, key, answer.status, json.dumps(answer.body))

    async def abandon(self, key: str) -> None:
        async with self._store.connection() as conn:
            await conn.execute(self._abandon, key)
