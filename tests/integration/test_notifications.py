"""Owner webhooks against real receivers on loopback and real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from sidecar.client import connection_update, decrypt_error
from sidecar.notify.delivery import sign
from sidecar.notify.owners import OwnersError, parse_owners
from tests.monitoring import run_tool
from tests.pgcluster import free_port
from tests.receiver import receiving, verified
from tests.seed import add_phone
from tests.server import Served, serving, sidecar_config
from tests.waiting import eventually

SECRET = b"platform-secret"
SALES_SECRET = b"sales-secret"


def owners_file(
    tmp_path: Path, platform_url: str, sales_url: str = "http://127.0.0.1:9/none", org7: str = "sales"
) -> Path:
    (tmp_path / "platform.secret").write_bytes(SECRET + b"\n")
    (tmp_path / "sales.secret").write_bytes(SALES_SECRET)
    path = tmp_path / "owners.yaml"
    path.write_text(
        f"""
defaultTeam: platform
teams:
  platform:
    webhookUrl: {platform_url}
    secretFile: {tmp_path / "platform.secret"}
  sales:
    webhookUrl: {sales_url}
    secretFile: {tmp_path / "sales.secret"}
organizations:
  "7": {org7}
phones:
  "4242": platform
"""
    )
    return path


async def post(served: Served, *events: dict[str, object]) -> None:
    async with aiohttp.ClientSession() as http, http.post(served.base + "/v1/events", json=list(events)) as response:
        assert response.status == 202, await response.text()


def fast(database: str, path: Path, **changes: object) -> object:
    return sidecar_config(database, owners_file=path, webhook_backoff_initial=0.05, **changes)


async def test_flips_notify_once_each_signed_and_in_order(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with receiving(SECRET) as receiver:
        async with serving(fast(database, owners_file(tmp_path, receiver.url))) as served:  # type: ignore[arg-type]
            await post(served, connection_update(1, pid, jid, "open"), decrypt_error(1, pid, jid, "Bad MAC"))
            await post(served, decrypt_error(1, pid, jid, "Bad MAC"))  # 2: unhealthy
            await eventually(lambda: receiver.events == ["session.unhealthy"])
            await post(served, decrypt_error(1, pid, jid, "bad decrypt", source="app-state"))  # still unhealthy
            await post(served, connection_update(1, pid, jid, "open"))  # recovered
            for _ in range(3):
                await post(served, decrypt_error(1, pid, jid, "Bad MAC"))  # unhealthy, then closed
            await eventually(lambda: len(receiver.received) == 4, what="four notifications")
            await served.components.runtime.settle()
            registry = served.components.metrics.registry
            delivered = registry.get_sample_value(
                "whatsapp_owner_notifications_total",
                {"team": "platform", "event": "session.unhealthy", "outcome": "delivered"},
            )
            assert registry.get_sample_value("whatsapp_owner_notification_latency_seconds_count") == 4
    assert receiver.events == ["session.unhealthy", "session.recovered", "session.unhealthy", "session.closed"]
    assert receiver.forged == 0 and receiver.attempts == 4
    assert delivered == 2
    first, recovered, _, closed = receiver.received
    assert first["stats"] == {
        "badMacErrors": 2,
        "badDecryptErrors": 0,
        "maxBadMacErrors": 3,
        "maxBadDecryptErrors": 5,
        "isHealthy": False,
    }
    assert (first["organizationId"], first["organizationPhoneId"], first["team"]) == (1, pid, "platform")
    assert first["instance"] and len(set(item["id"] for item in receiver.received)) == 4
    assert recovered["stats"]["isHealthy"] is True
    assert closed["reason"] == "bad_mac_limit"
    assert closed["close"]["keysDeleted"] > 0 and closed["close"]["badMacErrors"] == 3
    assert phone.bare not in str(receiver.received)  # no phone numbers in webhooks


async def test_retries_then_delivers_once(database: str, db: asyncpg.Connection, tmp_path: Path) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with receiving(SECRET, answers=[500, 500, 500]) as receiver:
        async with serving(fast(database, owners_file(tmp_path, receiver.url))) as served:  # type: ignore[arg-type]
            await post(served, *[decrypt_error(1, pid, jid, "Bad MAC")] * 2)
            await eventually(lambda: len(receiver.received) == 1, what="delivered after three 500s")
            retried = served.components.metrics.registry.get_sample_value(
                "whatsapp_owner_notifications_total",
                {"team": "platform", "event": "session.unhealthy", "outcome": "retried"},
            )
            # A later notification of the same session is delivered only once the earlier one is finished:
            # when it arrives, no retry of the first can follow.
            await post(served, connection_update(1, pid, jid, "open"))
            await eventually(lambda: "session.recovered" in receiver.events, what="the later marker delivered")
    assert receiver.events == ["session.unhealthy", "session.recovered"]
    assert receiver.attempts == 5
    assert retried == 3


async def test_receiver_down_dead_letters_and_4xx_is_not_retried(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}/hook"
    one = await add_phone(db, 1, "79001112233")
    seven = await add_phone(db, 7, "79004445566")
    async with receiving(SALES_SECRET, answers=[400]) as sales:
        path = owners_file(tmp_path, down, sales.url)
        async with serving(fast(database, path, webhook_max_attempts=3)) as served:  # type: ignore[arg-type]
            await post(served, *[decrypt_error(1, one.organization_phone_id, one.phone_jid, "Bad MAC")] * 2)
            await post(served, *[decrypt_error(7, seven.organization_phone_id, seven.phone_jid, "Bad MAC")] * 2)

            async def dead() -> list[dict[str, object]]:
                async with aiohttp.ClientSession() as http:
                    async with http.get(served.base + "/v1/notifications", params={"status": "dead"}) as response:
                        return list((await response.json())["notifications"])

            async def both_dead() -> bool:
                return len(await dead()) == 2

            await eventually(both_dead, what="both dead-lettered")
            rows = {row["organizationPhoneId"]: row for row in await dead()}
    assert rows[one.organization_phone_id]["attempts"] == 3  # retried up to the limit
    assert "ClientConnectorError" in str(rows[one.organization_phone_id]["lastError"])
    assert rows[seven.organization_phone_id]["attempts"] == 1 and rows[seven.organization_phone_id]["team"] == "sales"
    assert sales.attempts == 1  # a 400 is final
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.outbox WHERE status = 'dead'") == 2


async def test_hot_reload_changes_routing_and_a_bad_file_keeps_the_old_one(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 7, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with receiving(SECRET) as platform, receiving(SALES_SECRET) as sales:
        path = owners_file(tmp_path, platform.url, sales.url)
        async with serving(fast(database, path)) as served:  # type: ignore[arg-type]
            await post(served, *[decrypt_error(7, pid, jid, "Bad MAC")] * 2)
            await eventually(lambda: sales.events == ["session.unhealthy"])
            path.write_text("teams: [not, a, mapping]\n")
            assert served.components.owners.reload() is False  # rejected; sales still owns organization 7
            owners_file(tmp_path, platform.url, sales.url, org7="platform")
            await eventually(
                lambda: served.components.owners.current.team_name(7) == "platform",
                what="changed file picked up without a restart",
            )
            await post(served, connection_update(7, pid, jid, "open"))
            await eventually(lambda: platform.events == ["session.recovered"])
            async with aiohttp.ClientSession() as http, http.get(served.base + "/metrics") as response:
                body = await response.text()
    assert f'organization_phone_id="{pid}",team="platform"' in body
    assert sales.events == ["session.unhealthy"]


def test_owners_file_errors_name_the_key() -> None:
    base = "teams:\n  platform:\n    webhookUrl: https://hooks.example.com/p\n    secretEnv: P\n"
    env = {"P": "s"}
    assert parse_owners(base + "defaultTeam: platform\n", env).team_name(1) == "platform"
    cases = {
        "teams: [\n": "(file)",
        base + "defaultTeam: nobody\n": "defaultTeam",
        base + 'organizations:\n  "7": ghosts\n': "organizations.7",
        base + 'organizations:\n  "x": platform\n': "organizations.x",
        base.replace("secretEnv: P", "secret: plain"): "teams.platform.secret",
        base.replace("https://hooks.example.com/p", "ftp://x"): "teams.platform.webhookUrl",
        base + "extra: 1\n": "extra",
    }
    for text, key in cases.items():
        with pytest.raises(OwnersError) as error:
            parse_owners(text, env)
        assert error.value.key == key, text
    with pytest.raises(OwnersError) as missing:
        parse_owners(base, {})
    assert missing.value.key == "teams.platform.secretEnv" and "not set" in missing.value.problem
    # A Standard Webhooks secret is its decoded key; a malformed one is refused naming the key.
    raw_key = b"\x00\xff sixteen bytes.."
    whsec = "whsec_" + base64.b64encode(raw_key).decode()
    assert parse_owners(base + "defaultTeam: platform\n", {"P": whsec}).teams["platform"].secret == raw_key
    with pytest.raises(OwnersError) as malformed:
        parse_owners(base, {"P": "whsec_not base64!"})
    assert malformed.value.key == "teams.platform.secretEnv" and "base64" in malformed.value.problem


async def test_cli_refuses_an_invalid_owners_file(tmp_path: Path) -> None:
    bad = tmp_path / "owners.yaml"
    bad.write_text("defaultTeam: ghosts\n")
    for command in ("check-config", "serve"):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            command,
            "--listen",
            "127.0.0.1:0",
            "--owners-file",
            str(bad),
            stderr=asyncio.subprocess.PIPE,
        )
        _, errors = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 2, command
        assert "defaultTeam" in errors.decode()


async def test_sigkill_before_delivery_delivers_exactly_once_after_restart(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    receiver_port = free_port()
    path = owners_file(tmp_path, f"http://127.0.0.1:{receiver_port}/hook")
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--database-url",
        database,
        "--owners-file",
        str(path),
        "--webhook-backoff-initial",
        "0.2",
    ]

    async def start() -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.DEVNULL)

        async def ready() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, what="sidecar ready")
        return process

    first = await start()
    async with aiohttp.ClientSession() as http:
        events = [decrypt_error(1, pid, jid, "Bad MAC")] * 2
        async with http.post(f"http://127.0.0.1:{port}/v1/events", json=events) as response:
            assert response.status == 202

    async def in_outbox() -> bool:
        # One attempt made (the receiver is down) and reported: the row is not leased by the process we kill.
        query = "SELECT count(*) FROM wa_sidecar.outbox WHERE status = 'pending' AND attempts >= 1"
        return bool(await db.fetchval(query))

    await eventually(in_outbox, what="notification in the outbox")
    first.send_signal(signal.SIGKILL)  # the receiver is not up yet: nothing was delivered
    await first.wait()
    async with receiving(SECRET, port=receiver_port) as receiver:
        second = await start()
        try:
            await eventually(lambda: len(receiver.received) == 1, what="delivered after the restart")
            async with aiohttp.ClientSession() as http:  # a later marker of the same session (delivered in order)
                marker = [connection_update(1, pid, jid, "open")]
                async with http.post(f"http://127.0.0.1:{port}/v1/events", json=marker) as response:
                    assert response.status == 202
            await eventually(lambda: len(receiver.received) == 2, what="the later marker delivered")
        finally:
            second.terminate()
            await second.wait()
    assert receiver.events == ["session.unhealthy", "session.recovered"]
    assert await db.fetchval("SELECT count(*) FROM wa_sidecar.outbox WHERE status = 'delivered'") == 2


def test_the_readme_receiver_accepts_our_signature_and_rejects_forgeries_and_replays() -> None:
    body = b'{"event":"session.unhealthy"}'
    now = str(int(time.time()))

    def headers(message_id: str, timestamp: str, secret: bytes = SECRET) -> dict[str, str]:
        signature = sign(secret, message_id, timestamp, body)
        return {"webhook-id": message_id, "webhook-timestamp": timestamp, "webhook-signature": signature}

    assert verified(SECRET, headers("n1", now), body) == {"event": "session.unhealthy"}
    assert verified(b"other", headers("n1", now), body) is None  # a forgery
    assert verified(SECRET, headers("n1", now), body + b" ") is None  # a changed body
    assert verified(SECRET, {**headers("n1", now), "webhook-id": "n2"}, body) is None  # a replayed signature
    assert verified(SECRET, headers("n1", str(int(now) - 3600)), body) is None  # a replay an hour later
    # A whsec_ secret as configured is what the stock library takes as is.
    key = b"\x01\x02 random key bytes"
    assert verified("whsec_" + base64.b64encode(key).decode(), headers("n1", now, key), body) is not None


async def test_a_rotating_secret_signs_with_both_and_either_receiver_verifies(
    database: str, db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    new_key = b"the new key, 24 bytes..."
    monkeypatch.setenv("NEW_HOOK_SECRET", "whsec_" + base64.b64encode(new_key).decode())
    async with receiving(SECRET) as old_receiver, receiving(new_key) as new_receiver:
        path = tmp_path / "owners.yaml"
        (tmp_path / "platform.secret").write_bytes(SECRET)
        path.write_text(
            f"defaultTeam: platform\norganizations: {{'2': second}}\nteams:\n"
            f"  platform: {{webhookUrl: {old_receiver.url}, secretEnv: NEW_HOOK_SECRET, "
            f"previousSecretFile: {tmp_path / 'platform.secret'}}}\n"
            f"  second: {{webhookUrl: {new_receiver.url}, secretEnv: NEW_HOOK_SECRET, "
            f"previousSecretFile: {tmp_path / 'platform.secret'}}}\n"
        )
        async with serving(fast(database, path)) as served:  # type: ignore[arg-type]
            await post(served, *[decrypt_error(1, pid, jid, "Bad MAC")] * 2)
            await post(served, *[decrypt_error(2, 77, "79004445566@s.whatsapp.net", "Bad MAC")] * 2)
            await eventually(lambda: old_receiver.events == new_receiver.events == ["session.unhealthy"])
    # A receiver still on the old secret and one already on the new one both verified (stock library).
    assert old_receiver.forged == new_receiver.forged == 0


async def test_410_gone_disables_the_endpoint_until_the_owners_file_changes(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    async with receiving(SECRET, answers=[410]) as receiver:
        path = owners_file(tmp_path, receiver.url)
        async with serving(fast(database, path)) as served:  # type: ignore[arg-type]
            registry = served.components.metrics.registry
            await post(served, *[decrypt_error(1, pid, jid, "Bad MAC")] * 2)  # unhealthy: answered 410

            def disabled() -> float | None:
                return registry.get_sample_value("whatsapp_owner_webhook_disabled", {"team": "platform"})

            await eventually(lambda: disabled() == 1, what="the endpoint disabled")
            await post(served, connection_update(1, pid, jid, "open"))  # recovered: not even tried

            async def dead_letters() -> list[dict[str, object]]:
                async with aiohttp.ClientSession() as http, http.get(served.base + "/v1/notifications") as response:
                    return [n for n in (await response.json())["notifications"] if n["status"] == "dead"]

            async def both_dead() -> bool:
                return len(await dead_letters()) == 2

            await eventually(both_dead, what="both notifications dead-lettered")
            assert receiver.attempts == 1  # the second was never sent
            assert any("410 Gone" in str(n["lastError"]) for n in await dead_letters())
            path.write_text(path.read_text() + "\n# rotated\n")  # any change of the file re-enables it
            served.components.owners.reload()
            assert disabled() == 0
            await post(served, *[decrypt_error(1, pid, jid, "Bad MAC")] * 2)  # unhealthy again: delivered
            await eventually(lambda: receiver.events == ["session.unhealthy"], what="delivered after the change")


NODE_RECEIVER = Path(__file__).resolve().parents[1] / "node_receiver"


def readme_node_receiver() -> str:
    """The README's Node snippet, as written, plus a harness: one JSON {secret, headers, body} per stdin line in,
    the verified payload (or null) per line out."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "concepts" / "webhooks.md").read_text()
    snippet = text[text.index("```js\n// receiver (Node)\n") + len("```js\n") :]
    snippet = snippet[: snippet.index("```")]
    harness = (
        "\nconst lines = require('fs').readFileSync(0, 'utf8').split('\\n').filter(Boolean);\n"
        "for (const line of lines) { const c = JSON.parse(line); "
        "console.log(JSON.stringify(verified(c.secret, c.headers, c.body))); }\n"
    )
    return snippet + harness


async def test_the_readme_node_receiver_verifies_real_deliveries(
    database: str, db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (NODE_RECEIVER / "node_modules" / "standardwebhooks").exists():
        code, output = await run_tool("npm", "ci", "--no-audit", "--no-fund", cwd=NODE_RECEIVER, deadline=300)
        assert code == 0, output
    phone = await add_phone(db, 1, "79001112233")
    pid, jid = phone.organization_phone_id, phone.phone_jid
    key = b"node receiver key bytes!"
    whsec = "whsec_" + base64.b64encode(key).decode()
    monkeypatch.setenv("HOOK_SECRET", whsec)
    async with receiving(key) as receiver:
        path = tmp_path / "owners.yaml"
        path.write_text(
            f"defaultTeam: platform\nteams:\n  platform: {{webhookUrl: {receiver.url}, secretEnv: HOOK_SECRET}}\n"
        )
        async with serving(fast(database, path)) as served:  # type: ignore[arg-type]
            await post(served, *[decrypt_error(1, pid, jid, "Bad MAC")] * 2)
            await post(served, connection_update(1, pid, jid, "open"))
            await eventually(lambda: len(receiver.received) == 2, what="two deliveries")
    cases: list[dict[str, object]] = [
        {"secret": whsec, "headers": headers, "body": body.decode()} for headers, body in receiver.raw
    ]
    first_headers, first_body = receiver.raw[0]
    other = "whsec_" + base64.b64encode(b"another key entirely...").decode()
    forged = {"secret": whsec, "headers": first_headers, "body": first_body.decode().replace("unhealthy", "recovered")}
    stranger = {"secret": other, "headers": first_headers, "body": first_body.decode()}
    script = tmp_path / "receiver.cjs"
    script.write_text(readme_node_receiver())
    stdin = "".join(json.dumps(case) + "\n" for case in [*cases, forged, stranger])
    process = await asyncio.create_subprocess_exec(
        "node", str(script), cwd=NODE_RECEIVER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_RECEIVER / "node_modules")},
    )  # fmt: skip
    out, _ = await process.communicate(stdin.encode())
    results = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["event"] for r in results[:2]] == ["session.unhealthy", "session.recovered"]
    assert results[2:] == [None, None]  # a changed body and a wrong secret are refused
