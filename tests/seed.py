"""Rows like the seed backend's: organization phones and their Baileys auth keys."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

# A realistic key set for one phone: creds, app-state keys and versions, pre-keys, peer sessions, sender keys.
KEY_NAMES = (
    "creds",
    "app-state-sync-key-AAAAAFBQ",
    "app-state-sync-key-AAAAAFBR",
    "app-state-sync-version-regular_high",
    "app-state-sync-version-critical_block",
    "pre-key-1",
    "pre-key-2",
    "pre-key-3",
    "session-15550002222.0",
    "session-15550002222.3",
    "session-15550003333.0",
    "session-205550002222777_1.0",
    "sender-key-120363000000000001@g.us--15550002222:0",
    "sender-key-memory-120363000000000001@g.us",
    "lid-mapping-15550002222",
    "device-list-15550002222",
)


@dataclass(frozen=True)
class SeededPhone:
    organization_id: int
    organization_phone_id: int
    phone_jid: str

    @property
    def bare(self) -> str:
        return self.phone_jid.split("@")[0]


async def add_phone(
    db: asyncpg.Connection, organization_id: int, number: str, keys: tuple[str, ...] = KEY_NAMES
) -> SeededPhone:
    jid = f"{number}@s.whatsapp.net"
    phone_id = await db.fetchval(
        'INSERT INTO "OrganizationPhone" ("organizationId", "phoneJid", status, "qrCode") '
        "VALUES ($1, $2, 'connected', 'qr-old') RETURNING id",
        organization_id,
        jid,
    )
    await db.executemany(
        'INSERT INTO baileys_auth ("organizationId", "phoneJid", key, value, type) '
        "VALUES ($1, $2, $3, 'eyJ4IjoxfQ==', 'base64_json')",
        [(organization_id, number, key) for key in keys],
    )
    return SeededPhone(organization_id, phone_id, jid)


async def keys_of(db: asyncpg.Connection, phone: SeededPhone) -> set[str]:
    rows = await db.fetch(
        'SELECT key FROM baileys_auth WHERE "organizationId" = $1 AND "phoneJid" = $2',
        phone.organization_id,
        phone.bare,
    )
    return {row["key"] for row in rows}


async def phone_row(db: asyncpg.Connection, phone: SeededPhone) -> asyncpg.Record:
    row = await db.fetchrow('SELECT * FROM "OrganizationPhone" WHERE id = $1', phone.organization_phone_id)
    assert row is not None
    return row


REFUSE_KEY_DELETES = """
    CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'auth store is read-only'; END $$;
    CREATE TRIGGER refuse_delete BEFORE DELETE ON baileys_auth FOR EACH ROW EXECUTE FUNCTION refuse_delete();
"""


async def refuse_key_deletes(db: asyncpg.Connection) -> None:
    """A key store that refuses deletions for a reason of its own (not an outage): every key deletion fails."""
    await db.execute(REFUSE_KEY_DELETES)
