"""`check-config` on the key store: reachable, and where one phone's keys would be found (and how many are)."""

from __future__ import annotations

from typing import Any

import asyncpg

from sidecar.config import SchemaMapping
from sidecar.keystores.spec import KeyPlace, KeyStoreSpec, open_key_store
from sidecar.keystores.template import UnknownPhone
from sidecar.ports import KeyStoreFailed
from sidecar.rules.jid import bare_number
from sidecar.rules.records import PhoneRef
from sidecar.store.sqlnames import quote_identifier, quote_qualified


async def sample_phone(connection: asyncpg.Connection, mapping: SchemaMapping) -> PhoneRef | None:
    """One phone of the phone table (the lowest id), to show where its keys would be found."""
    row = await connection.fetchrow(
        f"SELECT {quote_identifier(mapping.phone_id_column)} AS id, "
        f"{quote_identifier(mapping.phone_organization_column)} AS organization, "
        f"{quote_identifier(mapping.phone_jid_column)} AS jid FROM {quote_qualified(mapping.phone_table)} "
        f"ORDER BY {quote_identifier(mapping.phone_id_column)} LIMIT 1"
    )
    if row is None or not isinstance(row["id"], int) or not isinstance(row["organization"], int):
        return None
    jid = row["jid"]
    return PhoneRef(row["organization"], row["id"], bare_number(jid) if isinstance(jid, str) and jid else None)


async def check_key_store(spec: KeyStoreSpec, sample: PhoneRef | None, wait_seconds: float) -> dict[str, Any]:
    """What the check says of the key store; StoreUnavailable when it cannot be reached."""
    summary: dict[str, Any] = {"kind": str(spec.place), "at": spec.describe()}
    store = open_key_store(spec, wait_seconds)
    if store is None:
        if spec.place is KeyPlace.RUNTIME:
            summary["note"] = "the runtime deletes the keys and acks with keysDeleted (the Baileys adapter's authKeys)"
        return summary
    try:
        await store.ping()
        summary["reachable"] = True
        if sample is not None:
            entry: dict[str, Any] = {"organizationPhoneId": sample.organization_phone_id}
            try:
                entry["name"] = store.name_of(sample)
                entry["keys"] = (await store.delete(sample, None, only_count=True)).deleted
            except (UnknownPhone, KeyStoreFailed) as error:
                entry["problem"] = str(error)
            summary["samplePhone"] = entry
    finally:
        await store.close()
    return summary
