"""Where a heal or a close deletes the phone's auth keys, chosen once (--key-store):

- in the session store's own step (the PostgreSQL table, or the embedded store), inside the transaction that
  writes the session's state: the default;
- in a key store of their own (ports.KeyStore: a Redis hash, a folder per phone), before the close's database
  half, which records what it deleted;
- by the runtime, through the auth state it owns: `auth.clear` and `session.end` ask it, and its ack says how
  many (`keysDeleted`).

A key store that cannot be reached is tried again with backoff for as long as a close waits for its database
steps; after that the deletion is reported pending and goes on in the background until it is done (never
reported as done before it is)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.ports import KeysRemoved, KeyStore, KeyStoreFailed, StoreUnavailable
from sidecar.rules.records import PhoneRef, StepOutcome, without_numbers
from sidecar.runtime.tasks import BackgroundTasks

log = logging.getLogger("sidecar.keys")

RETRY_INITIAL_SECONDS = 0.1
RETRY_MAX_SECONDS = 10.0
BACKGROUND_SECONDS = 3600.0  # a deletion still pending this long after its close is given up (and logged)


@dataclass(frozen=True, slots=True)
class Removal:
    outcome: str  # ok, skipped: …, pending: …, failed: …
    deleted: int | None  # None: nothing is known to be deleted


@dataclass(frozen=True)
class KeyRemoval:
    store: KeyStore | None = None
    by_runtime: bool = False

    @property
    def in_step(self) -> bool:
        """The session store's own step deletes them (DeleteKeys, Logout)."""
        return self.store is None and not self.by_runtime

    async def remove(
        self,
        phone: PhoneRef,
        prefixes: Sequence[str] | None,
        observe: bool,
        wait_seconds: float,
        tasks: BackgroundTasks,
    ) -> Removal:
        """Through the key store (`self.store` is set): delete, or count in observe mode."""
        store = self.store
        assert store is not None
        attempt = asyncio.ensure_future(_until_reachable(store, phone, prefixes, observe, BACKGROUND_SECONDS))
        try:
            removed = await asyncio.wait_for(asyncio.shield(attempt), wait_seconds)
        except TimeoutError:
            tasks.spawn(_finish_later(attempt, phone))
            return Removal(f"{StepOutcome.PENDING}: the key store is unreachable; deleting once it is back", None)
        except KeyStoreFailed as error:
            return Removal(f"{StepOutcome.FAILED}: KeyStoreFailed: {error}", None)
        except StoreUnavailable as error:
            return Removal(f"{StepOutcome.FAILED}: StoreUnavailable: {error}", None)
        except Exception as error:  # the template could not name this phone (its number unknown), and the like
            return Removal(f"{StepOutcome.FAILED}: {type(error).__name__}: {error}", None)
        if observe:
            return Removal(f"{StepOutcome.SKIPPED}: observe mode, would delete {removed.deleted}", None)
        if removed.failures:
            listed = without_numbers("; ".join(removed.failures[:5])) + ("; …" if len(removed.failures) > 5 else "")
            return Removal(f"{StepOutcome.FAILED}: {len(removed.failures)} not deleted: {listed}", removed.deleted)
        return Removal(StepOutcome.OK, removed.deleted)


async def _until_reachable(
    store: KeyStore, phone: PhoneRef, prefixes: Sequence[str] | None, observe: bool, give_up_after: float
) -> KeysRemoved:
    delay, deadline = RETRY_INITIAL_SECONDS, time.monotonic() + give_up_after
    while True:
        try:
            return await store.delete(phone, prefixes, only_count=observe)
        except StoreUnavailable:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)


async def _finish_later(attempt: asyncio.Future[KeysRemoved], phone: PhoneRef) -> None:
    ids = {"organizationId": phone.organization_id, "organizationPhoneId": phone.organization_phone_id}
    try:
        removed = await attempt
    except Exception as error:
        log.error("auth keys left undeleted: %s", without_numbers(str(error)), extra={"fields": ids})
        return
    fields = {**ids, "keysDeleted": removed.deleted, "notDeleted": len(removed.failures)}
    log.warning("auth keys deleted once the key store was back", extra={"fields": fields})
