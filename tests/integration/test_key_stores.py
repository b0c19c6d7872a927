"""Heals and closes against every key store (--key-store): a real redis-server (read back with redis-cli), real
folders as useMultiFileAuthState writes them (read back with os.listdir), and a runtime that deletes its own keys
(its acks' keysDeleted). Each: a Bad Decrypt deletes only that phone's app-state-sync-*, a Bad MAC only the
failing peer's sessions, the third Bad MAC everything of that phone and nothing of its neighbour."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.client import RuntimeClient, connection_update, decrypt_error
from sidecar.keystores.spec import parse_key_store
from sidecar.ports import KeyStore
from sidecar.rules.safety import Mode
from sidecar.runtime import KeyRemoval
from sidecar.store.memory import MemoryStore
from tests.harness import Harness, runtime_over
from tests.redis_server import RedisServer
from tests.seed import KEY_NAMES, add_phone
from tests.server import serving, sidecar_config
from tests.waiting import eventually

ORG = 1
PHONE_ID, NEIGHBOUR_ID = 11, 12
JID, NEIGHBOUR_JID = "79001112233@s.whatsapp.net", "79004445566@s.whatsapp.net"
PEER = "15550002222@s.whatsapp.net"
PEER_SESSIONS = {"session-15550002222.0", "session-15550002222.3"}
APP_STATE = {name for name in KEY_NAMES if name.startswith("app-state-sync-")}
REPO = Path(__file__).resolve().parents[2]


def file_name(key: str) -> str:
    """Baileys' useMultiFileAuthState file name for a key (its fixFileName, restated here)."""
    return key.replace("/", "__").replace(":", "-") + ".json"


@dataclass
class Layout:
    """One store's layout: how the test seeds a phone's keys and reads them back without the sidecar."""

    store: KeyStore
    kind: str
    redis: RedisServer | None = None
    folder: Path | None = None

    def seed(self, phone_id: int) -> None:
        if self.redis is not None:
            pairs = [part for name in KEY_NAMES for part in (name, json.dumps({"key": name}))]
            self.redis.cli("HSET", f"evolution:baileys:{phone_id}", *pairs)
        else:
            assert self.folder is not None
            path = self.folder / f"org-{ORG}" / str(phone_id)
            path.mkdir(parents=True, exist_ok=True)
            for name in KEY_NAMES:
                (path / file_name(name)).write_text(json.dumps({"key": name}))

    def present(self, phone_id: int) -> set[str]:
        """The phone's key names, read with redis-cli or from the file system."""
        if self.redis is not None:
            return self.redis.fields(f"evolution:baileys:{phone_id}")
        assert self.folder is not None
        path = self.folder / f"org-{ORG}" / str(phone_id)
        on_disk = set(os.listdir(path)) if path.exists() else set()
        return {name for name in KEY_NAMES if file_name(name) in on_disk}


@pytest.fixture(params=["redis", "folder"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Layout]:
    if request.param == "redis":
        redis = RedisServer().start()
        spec = parse_key_store(f"{redis.url}?key=evolution:baileys:{{organizationPhoneId}}")
        try:
            yield Layout(_open(spec), "redis", redis=redis)
        finally:
            redis.remove()
    else:
        spec = parse_key_store(f"file://{tmp_path}/org-{{organizationId}}/{{organizationPhoneId}}")
        yield Layout(_open(spec), "folder", folder=tmp_path)


def _open(spec: Any) -> KeyStore:
    from sidecar.keystores.spec import open_key_store

    store = open_key_store(spec, 2.0)
    assert store is not None
    return store


@pytest.fixture
async def harness(layout: Layout) -> AsyncIterator[Harness]:
    layout.seed(PHONE_ID)
    layout.seed(NEIGHBOUR_ID)
    async with runtime_over(None, keys=KeyRemoval(layout.store), database_step_timeout=2.0) as h:
        yield h
    await layout.store.close()


async def test_a_bad_decrypt_deletes_only_that_phones_app_state_keys(layout: Layout, harness: Harness) -> None:
    socket = harness.socket(PHONE_ID)
    assert await harness.runtime.handle_bad_decrypt_error(ORG, PHONE_ID, JID) is True
    await harness.runtime.settle()
    assert layout.present(PHONE_ID) == set(KEY_NAMES) - APP_STATE
    assert layout.present(NEIGHBOUR_ID) == set(KEY_NAMES)
    assert socket.cleared == [("app-state-sync-",)], "the runtime was told after the deletion"


async def test_a_bad_mac_heals_only_the_failing_peers_sessions(layout: Layout, harness: Harness) -> None:
    socket = harness.socket(PHONE_ID)
    assert await harness.runtime.handle_bad_mac_error(ORG, PHONE_ID, JID, PEER) is True
    await harness.runtime.settle()
    assert layout.present(PHONE_ID) == set(KEY_NAMES) - PEER_SESSIONS
    assert layout.present(NEIGHBOUR_ID) == set(KEY_NAMES)
    assert socket.cleared == [("session-15550002222.", "session-15550002222_")]


async def test_the_third_bad_mac_deletes_everything_of_that_phone_and_records_the_count(
    layout: Layout, harness: Harness
) -> None:
    socket = harness.socket(PHONE_ID)
    for _ in range(2):
        await harness.runtime.handle_bad_mac_error(ORG, PHONE_ID, JID, PEER)
    await harness.runtime.settle()
    before_close = layout.present(PHONE_ID)
    assert before_close == set(KEY_NAMES) - PEER_SESSIONS
    assert await harness.runtime.handle_bad_mac_error(ORG, PHONE_ID, JID, PEER) is False
    await harness.runtime.settle()
    assert socket.ended == ["3 Bad MAC errors (limit 3)"]
    assert layout.present(PHONE_ID) == set(), "everything of that phone is gone, creds too"
    assert layout.present(NEIGHBOUR_ID) == set(KEY_NAMES), "nothing of its neighbour"
    assert isinstance(harness.store, MemoryStore)
    [closure] = harness.store.closures
    assert closure.keys_deleted == len(before_close)
    assert closure.steps["authKeys"] == "ok"
    if layout.redis is not None:
        assert layout.redis.cli("EXISTS", f"evolution:baileys:{PHONE_ID}") == "0"


async def test_observe_mode_counts_and_deletes_nothing(layout: Layout) -> None:
    layout.seed(PHONE_ID)
    spec_text = (
        f"{layout.redis.url}?key=evolution:baileys:{{organizationPhoneId}}"
        if layout.redis is not None
        else f"file://{layout.folder}/org-{{organizationId}}/{{organizationPhoneId}}"
    )
    config = sidecar_config(None, key_store=parse_key_store(spec_text), mode=Mode.OBSERVE)
    async with serving(config) as served:
        runtime = served.components.runtime
        for _ in range(3):
            await runtime.handle_bad_mac_error(ORG, PHONE_ID, JID, PEER)
        await runtime.settle()
        store = served.components.store
        assert isinstance(store, MemoryStore)
        [closure] = store.closures
    assert layout.present(PHONE_ID) == set(KEY_NAMES), "observe mode deletes nothing"
    assert closure.keys_deleted is None
    assert closure.steps["authKeys"] == f"skipped: observe mode, would delete {len(KEY_NAMES)}"
    await layout.store.close()


async def test_with_redis_down_a_close_reports_no_keys_it_did_not_delete_and_deletes_them_once_back() -> None:
    redis = RedisServer(persist=True).start()
    try:
        store = _open(parse_key_store(f"{redis.url}?key=evolution:baileys:{{organizationPhoneId}}"))
        layout = Layout(store, "redis", redis=redis)
        layout.seed(PHONE_ID)
        layout.seed(NEIGHBOUR_ID)
        async with runtime_over(None, keys=KeyRemoval(store), database_step_timeout=1.0) as h:
            socket = h.socket(PHONE_ID)
            redis.stop()
            for _ in range(3):
                await h.runtime.handle_bad_mac_error(ORG, PHONE_ID, JID)
            memory = h.store
            assert isinstance(memory, MemoryStore)
            # Not settle(): the deletion goes on in the background until Redis is back.
            await eventually(lambda: len(memory.closures) == 1, what="the close recorded while Redis is away")
            [closure] = memory.closures
            assert socket.ended, "the socket is ended all the same"
            assert closure.keys_deleted is None, "no count for keys it could not delete"
            assert closure.steps["authKeys"].startswith("pending: the key store is unreachable")
            redis.start()
            assert layout.present(NEIGHBOUR_ID) == set(KEY_NAMES), "what it held survived the restart"
            await eventually(
                lambda: redis.cli("EXISTS", f"evolution:baileys:{PHONE_ID}") == "0",
                what="the deletion finished once Redis was back",
            )
            await h.runtime.settle()
            assert layout.present(NEIGHBOUR_ID) == set(KEY_NAMES)
        await store.close()
    finally:
        redis.remove()


async def test_the_runtime_key_store_records_what_the_runtime_says_it_deleted(tmp_path: Path) -> None:
    log = tmp_path / "closures.jsonl"
    said: list[dict[str, Any]] = []

    async def end(command: dict[str, Any]) -> int:
        said.append(command)
        return 14

    async def clear(command: dict[str, Any]) -> int:
        said.append(command)
        return 2

    config = sidecar_config(
        None, key_store=parse_key_store("runtime"), runtime_token="runtime-secret-0123", closure_log_path=log
    )
    async with (
        serving(config) as served,
        RuntimeClient(served.ws_url, "runtime-secret-0123", on_session_end=end, on_auth_clear=clear) as client,
    ):
        await client.wait_connected()
        await client.send(connection_update(ORG, PHONE_ID, JID, "open"))
        bad_mac = decrypt_error(ORG, PHONE_ID, JID, "Bad MAC", source="message", peer_jid=PEER)
        await client.send(bad_mac)
        await eventually(lambda: len(said) == 1, what="the first Bad MAC's heal asked of the runtime")
        for _ in range(2):
            await client.send(bad_mac)
        await eventually(lambda: log.exists() and bool(log.read_text().strip()), what="the closure logged")
        await served.components.runtime.settle()
        async with aiohttp.ClientSession() as http, http.get(served.base + "/metrics") as response:
            text = await response.text()
    assert [command["type"] for command in said] == ["auth.clear", "session.end"]
    deleted = {
        sample.labels["scope"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "whatsapp_auth_keys_deleted_total"
    }
    assert deleted.get("peer_session") == 2, deleted
    assert said[0]["keyPrefixes"] == ["session-15550002222.", "session-15550002222_"]
    closure = json.loads(log.read_text().splitlines()[-1])
    assert closure["keysDeleted"] == 14, "what the runtime's ack said"
    assert closure["steps"]["authKeys"] == "ok"


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("file:///var/lib/auth/../{organizationPhoneId}", "may not hold '..'"),
        ("file:///{organizationPhoneId}", "the folder before the first placeholder is /"),
        ("file:///var/lib/auth/all", "names no single phone"),
        ("redis://127.0.0.1:6379/0?key=evolution:baileys", "names no single phone"),
        ("redis://127.0.0.1:6379/0?key=x:{instance}", "unknown placeholder {instance}"),
        ("redis://127.0.0.1:6379/0", "needs one key=TEMPLATE"),
        ("mongodb://h/x", "must be postgresql, runtime"),
    ],
)
def test_a_key_store_that_could_reach_other_phones_is_refused_at_start_up(value: str, said: str) -> None:
    for command in ("serve", "check-config"):
        done = subprocess.run(
            [sys.executable, "-m", "sidecar", command, "--key-store", value, "--listen", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "key-store" in done.stderr and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


async def test_check_config_finds_a_sample_phones_keys_and_names_the_store_when_the_table_is_missing(
    database: str, db: asyncpg.Connection
) -> None:
    redis = RedisServer().start()
    try:
        phone = await add_phone(db, ORG, "79001112233")
        pairs = [part for name in KEY_NAMES for part in (name, "{}")]
        redis.cli("HSET", f"evolution:baileys:{phone.organization_phone_id}", *pairs)
        await db.execute('DROP TABLE "baileys_auth"')
        url = f"{redis.url}?key=evolution:baileys:{{organizationPhoneId}}"
        migrate = [sys.executable, "-m", "sidecar", "migrate", "--database-url", database]
        migrated = await asyncio.to_thread(subprocess.run, migrate, capture_output=True, cwd=REPO, timeout=60)
        assert migrated.returncode == 0
        check = [sys.executable, "-m", "sidecar", "check-config", "--database-url", database]
        missing = await asyncio.to_thread(subprocess.run, check, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert missing.returncode == 2
        assert "baileys_auth" in missing.stderr and "--key-store" in missing.stderr
        assert "--schema-override" in missing.stderr and "docs/concepts/stores.md" in missing.stderr
        found = await asyncio.to_thread(
            subprocess.run, [*check, "--key-store", url], capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert found.returncode == 0, found.stderr
        summary = json.loads(found.stdout)
        assert summary["keyStore"]["reachable"] is True
        assert summary["keyStore"]["samplePhone"] == {
            "organizationPhoneId": phone.organization_phone_id,
            "name": f"evolution:baileys:{phone.organization_phone_id}",
            "keys": len(KEY_NAMES),
        }
        assert "secret" not in summary["keyStore"]["at"]
        redis.stop()
        away = await asyncio.to_thread(
            subprocess.run, [*check, "--key-store", url], capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert away.returncode == 3 and "key store unavailable" in away.stderr, away.stderr
    finally:
        redis.remove()


async def test_a_file_the_folder_store_cannot_delete_is_named_and_not_counted(tmp_path: Path) -> None:
    store = _open(parse_key_store(f"file://{tmp_path}/org-{{organizationId}}/{{organizationPhoneId}}"))
    layout = Layout(store, "folder", folder=tmp_path)
    layout.seed(PHONE_ID)
    stuck = tmp_path / f"org-{ORG}" / str(PHONE_ID) / "creds.json"
    marked = await asyncio.to_thread(subprocess.run, ["chattr", "+i", str(stuck)], capture_output=True)
    if marked.returncode != 0:
        pytest.skip("this file system has no immutable attribute (chattr +i)")
    try:
        async with runtime_over(None, keys=KeyRemoval(store)) as h:
            h.socket(PHONE_ID)
            for _ in range(2):
                await h.runtime.handle_bad_mac_error(ORG, PHONE_ID, JID)
            await h.runtime.settle()
            before_close = layout.present(PHONE_ID)
            await h.runtime.handle_bad_mac_error(ORG, PHONE_ID, JID)
            await h.runtime.settle()
            assert isinstance(h.store, MemoryStore)
            [closure] = h.store.closures
        assert layout.present(PHONE_ID) == {"creds"}, "only the immutable file is left"
        assert closure.steps["authKeys"].startswith("failed: 1 not deleted: creds.json: Operation not permitted")
        assert closure.keys_deleted == len(before_close) - 1, "keysDeleted counts only what went"
    finally:
        await asyncio.to_thread(subprocess.run, ["chattr", "-i", str(stuck)], check=True)
        await store.close()
