"""A simulated runtime fleet: N organization phones, each receiving end-to-end encrypted messages from several
peers and app-state patches, with faults injected at the key level. Its errors are real decryption failures
(sidecar.sim.crypto), reported over the runtime link with the Python SDK exactly as a runtime would; it obeys the
sidecar's commands, so a heal really heals and a logout really logs out (until a simulated QR re-scan).
Every message has an id; a failed one gets a retry receipt, which most senders answer: the re-keyed re-send
decrypts (`message.recovered`), unless the phone's own keys are broken (a truly broken session: every message
fails, its retries too, until it is logged out). What is never re-sent is lost.
Some sessions can go deaf (nothing arrives any more, probes still answered) until the sidecar restarts them, and
some are idle (no traffic at all): the liveness watch must find the first and never flag the second.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sidecar.client import Command, RuntimeClient, activity, connection_update, decrypt_error, message_recovered
from sidecar.sim.crypto import AppStateKey, DecryptFailure, PeerSession, corrupt

TICK_SECONDS = 0.1
APP_STATE_PREFIX = "app-state-sync-"


@dataclass(frozen=True)
class FaultRates:
    bad_mac: float = 0.01  # chance a message finds its peer session desynchronized
    bad_decrypt: float = 0.05  # chance an app-state sync finds the cached key corrupted
    flap: float = 0.001  # chance per session and tick of a network flap (close 428, then open)
    deaf: float = 0.0  # chance per session and tick of going deaf: nothing arrives, pings still answered
    broken: float = 0.0  # chance per session and tick that the phone's own keys break (retries fail too)


@dataclass(frozen=True)
class FleetConfig:
    sessions: int = 50
    organizations: int = 5
    peers: int = 4
    messages_per_second: float = 2.0  # per session
    patches_per_second: float = 0.2  # per session
    rescan_seconds: float = 3.0  # a logged-out phone comes back after a QR re-scan this long after
    runtimes: int = 2  # runtime processes (SDK connections) the phones are spread over
    faults: FaultRates = field(default_factory=FaultRates)
    first_phone_id: int = 1
    seed: int | None = None
    idle_share: float = 0.0  # sessions that never receive anything (never to be flagged deaf)
    activity_seconds: float = 1.0  # how often a session with inbound traffic reports it
    retry_answered: float = 0.97  # share of retry receipts the sender answers (the rest: offline, gone)
    retry_seconds: float = 0.5  # from a failure to the sender's re-send


@dataclass
class FleetStats:
    messages: int = 0
    patches: int = 0
    faults_injected: int = 0
    faults_healed: int = 0  # fixed by an auth.clear, the session kept
    faults_logged_out: int = 0  # still broken when the sidecar ended the session
    errors_reported: int = 0
    heals_obeyed: int = 0
    logouts_obeyed: int = 0
    rescans: int = 0
    flaps: int = 0
    deaf_injected: int = 0
    deaf_restarted: int = 0  # restarted by the sidecar while deaf (the restart cures it)
    idle_flagged: int = 0  # probes or restarts of an idle session: false positives
    probes: int = 0
    detection_seconds: list[float] = field(default_factory=list)  # deaf -> restart command
    messages_failed: int = 0  # distinct messages that failed to decrypt
    messages_recovered: int = 0  # re-sent after the retry receipt and decrypted (reported as message.recovered)
    messages_unrecovered: int = 0  # never re-sent, or the re-send failed too: the truth the lost count measures
    healed_by_retry: int = 0  # peer faults the retry's new session fixed before any heal
    broken_injected: int = 0

    @property
    def heal_ratio(self) -> float | None:
        settled = self.faults_healed + self.faults_logged_out
        return self.faults_healed / settled if settled else None


class SimPhone:
    def __init__(self, organization_id: int, phone_id: int, peers: int, rng: random.Random) -> None:
        self.organization_id, self.phone_id = organization_id, phone_id
        self.jid = f"7900{phone_id:07d}@s.whatsapp.net"
        self.peer_users = [f"1555{phone_id:05d}{index:02d}" for index in range(peers)]
        self.rng = rng
        self.logged_out_until: float | None = None
        self.idle = False
        self.deaf_since: float | None = None
        self.sent = 0  # message ids
        self.inbound = {"messages": 0, "receipts": 0, "notifications": 0}
        self.last_inbound: datetime | None = None
        self.reset_keys()

    def reset_keys(self) -> None:
        """Fresh sessions with every peer and a fresh app-state key (a new login)."""
        self.sessions: dict[str, PeerSession] = {peer: PeerSession() for peer in self.peer_users}
        self.broken_peers: set[str] = set()
        self.broken = False  # its own keys: every session with it fails, new ones too
        self.server_key = AppStateKey()
        self.cached_key = self.server_key
        self.app_state_broken = False

    @property
    def ids(self) -> tuple[int, int, str]:
        return self.organization_id, self.phone_id, self.jid

    def received(self, kind: str) -> None:
        self.inbound[kind] += 1
        self.last_inbound = datetime.now(UTC)

    @property
    def outstanding_faults(self) -> int:
        return len(self.broken_peers) + int(self.app_state_broken) + int(self.broken)

    def next_message_id(self) -> str:
        self.sent += 1
        return f"3EB0{self.phone_id:06X}{self.sent:08X}"


@dataclass(frozen=True)
class Retry:
    due: float
    phone: SimPhone
    peer: str
    message_id: str
    plaintext: bytes
    login: int  # the phone's re-scans when it failed: a retry for an older pairing is never answered


class SimFleet:
    def __init__(self, url: str, config: FleetConfig, token: str | None = None) -> None:
        self.config = config
        self.stats = FleetStats()
        rng = random.Random(config.seed)
        self.rng = rng
        self.phones = {
            config.first_phone_id + index: SimPhone(
                1 + index % config.organizations, config.first_phone_id + index, config.peers, rng
            )
            for index in range(config.sessions)
        }
        for phone in rng.sample(list(self.phones.values()), int(config.idle_share * config.sessions)):
            phone.idle = True
        self.clients = [
            RuntimeClient(
                url, token, on_session_end=self._on_session_end, on_auth_clear=self._on_auth_clear,
                on_session_probe=self._on_probe, on_session_restart=self._on_restart,
            )
            for _ in range(max(1, config.runtimes))
        ]  # fmt: skip
        self._flapping: dict[int, float] = {}
        self._next_report = 0.0
        self._retries: list[Retry] = []
        self._logins: dict[int, int] = {}

    def _client(self, phone: SimPhone) -> RuntimeClient:
        return self.clients[phone.phone_id % len(self.clients)]

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None) -> FleetStats:
        for client in self.clients:
            await client.start()
        try:
            for phone in self.phones.values():
                await self._client(phone).send(connection_update(*phone.ids, "open"))
            deadline = None if duration is None else time.monotonic() + duration
            while not (stop is not None and stop.is_set()) and (deadline is None or time.monotonic() < deadline):
                await self.tick(time.monotonic())
                await asyncio.sleep(TICK_SECONDS)
            for client in self.clients:
                await client.flush()
        finally:
            for client in self.clients:
                await client.stop()
        return self.stats

    async def tick(self, now: float) -> None:
        rates, config = self.config.faults, self.config
        if now >= self._next_report:
            self._next_report = now + config.activity_seconds
            await self._report_activity()
        await self._answer_retries(now)
        for phone in self.phones.values():
            if phone.logged_out_until is not None:
                if now >= phone.logged_out_until:
                    await self._rescan(phone)
                continue
            if phone.phone_id in self._flapping:
                if now >= self._flapping[phone.phone_id]:  # back after the flap (not before: pop only then)
                    del self._flapping[phone.phone_id]
                    await self._client(phone).send(connection_update(*phone.ids, "open"))
                continue
            if self.rng.random() < rates.flap:
                self.stats.flaps += 1
                self._flapping[phone.phone_id] = now + 0.3
                await self._client(phone).send(connection_update(*phone.ids, "close", 428))
                continue
            if phone.idle or phone.deaf_since is not None:
                continue  # nothing arrives
            if self.rng.random() < rates.deaf:
                phone.deaf_since = now
                self.stats.deaf_injected += 1
                continue
            if not phone.broken and self.rng.random() < rates.broken:
                phone.broken = True
                self.stats.broken_injected += 1
            if self.rng.random() < config.messages_per_second * TICK_SECONDS:
                await self._message(phone, now)
            if self.rng.random() < config.patches_per_second * TICK_SECONDS:
                await self._patch(phone)

    async def _report_activity(self) -> None:
        for phone in self.phones.values():
            if phone.last_inbound is None or not any(phone.inbound.values()):
                continue
            counts, phone.inbound = phone.inbound, dict.fromkeys(phone.inbound, 0)
            event = activity(
                *phone.ids, phone.last_inbound,
                messages=counts["messages"], receipts=counts["receipts"], notifications=counts["notifications"],
            )  # fmt: skip
            await self._client(phone).send(event)

    async def _on_probe(self, command: Command) -> float:
        """A deaf session still answers: a probe succeeds (only silence that goes on makes it deaf)."""
        phone = self.phones[int(command["organizationPhoneId"])]
        self.stats.probes += 1
        if phone.idle:
            self.stats.idle_flagged += 1
        return self.rng.uniform(20, 80)

    async def _on_restart(self, command: Command) -> None:
        phone = self.phones.get(int(command["organizationPhoneId"]))
        if phone is None:
            return
        if phone.idle:
            self.stats.idle_flagged += 1
        if phone.deaf_since is not None:
            self.stats.deaf_restarted += 1
            self.stats.detection_seconds.append(time.monotonic() - phone.deaf_since)
            phone.deaf_since = None  # a new socket hears again
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, self._reconnect(phone))

    async def _reconnect(self, phone: SimPhone) -> None:
        await self._client(phone).send(connection_update(*phone.ids, "close", 515))
        await self._client(phone).send(connection_update(*phone.ids, "open"))

    async def _message(self, phone: SimPhone, now: float) -> None:
        self.stats.messages += 1
        phone.received("messages")
        peer = self.rng.choice(phone.peer_users)
        session = phone.sessions[peer]
        if peer not in phone.broken_peers and self.rng.random() < self.config.faults.bad_mac:
            session.desynchronize()
            phone.broken_peers.add(peer)
            self.stats.faults_injected += 1
        if phone.broken:
            session.desynchronize()  # whatever session it has: its own keys are wrong
        message_id, plaintext = phone.next_message_id(), b"hello from " + peer.encode()
        try:
            session.deliver(plaintext)
        except DecryptFailure as failure:
            self.stats.messages_failed += 1
            await self._failed(phone, peer, message_id, failure)
            if self.rng.random() < self.config.retry_answered:
                login = self._logins.get(phone.phone_id, 0)
                self._retries.append(Retry(now + self.config.retry_seconds, phone, peer, message_id, plaintext, login))
            else:
                self.stats.messages_unrecovered += 1  # the sender is gone: never re-sent

    async def _failed(self, phone: SimPhone, peer: str, message_id: str, failure: DecryptFailure) -> None:
        self.stats.errors_reported += 1
        event = decrypt_error(
            *phone.ids, str(failure), source="message", peer_jid=f"{peer}@s.whatsapp.net", message_id=message_id
        )
        await self._client(phone).send(event | {"messageType": "msg"})

    async def _answer_retries(self, now: float) -> None:
        """The senders re-send after the retry receipt: a new session, the same message."""
        due = [retry for retry in self._retries if retry.due <= now]
        if not due:
            return
        self._retries = [retry for retry in self._retries if retry.due > now]
        for retry in due:
            phone = retry.phone
            if phone.logged_out_until is not None or self._logins.get(phone.phone_id, 0) != retry.login:
                self.stats.messages_unrecovered += 1  # logged out since: the re-send reaches no session
                continue
            try:
                phone.sessions[retry.peer].retry(retry.plaintext, receiver_broken=phone.broken)
            except DecryptFailure as failure:
                self.stats.messages_unrecovered += 1
                await self._failed(phone, retry.peer, retry.message_id, failure)  # the retry failed too
                continue
            self.stats.messages_recovered += 1
            if retry.peer in phone.broken_peers:
                phone.broken_peers.discard(retry.peer)
                self.stats.healed_by_retry += 1
            await self._client(phone).send(message_recovered(*phone.ids, retry.message_id, "retry"))

    async def _patch(self, phone: SimPhone) -> None:
        self.stats.patches += 1
        phone.received("notifications")
        if not phone.app_state_broken and self.rng.random() < self.config.faults.bad_decrypt:
            phone.cached_key = corrupt(phone.cached_key)
            phone.app_state_broken = True
            self.stats.faults_injected += 1
        patch = phone.server_key.encrypt(b'{"index":["mute","15550000000@s.whatsapp.net"],"value":true}')
        try:
            phone.cached_key.decrypt(patch)
        except DecryptFailure as failure:
            self.stats.errors_reported += 1
            await self._client(phone).send(decrypt_error(*phone.ids, str(failure), source="app-state"))

    async def _on_auth_clear(self, command: Command) -> None:
        phone = self.phones.get(int(command["organizationPhoneId"]))
        if phone is None or phone.logged_out_until is not None:
            return
        self.stats.heals_obeyed += 1
        prefixes = tuple(command.get("keyPrefixes") or ())
        if any(prefix.startswith(APP_STATE_PREFIX) for prefix in prefixes) and phone.app_state_broken:
            phone.cached_key = phone.server_key  # dropped, then synced fresh from the server
            phone.app_state_broken = False
            self.stats.faults_healed += 1
        for peer in list(phone.broken_peers):
            # `session-<peer>.` for a named peer, `session-` for all of them: the session is re-established.
            if any(f"session-{peer}.".startswith(prefix) for prefix in prefixes):
                phone.sessions[peer] = PeerSession()
                phone.broken_peers.discard(peer)
                self.stats.faults_healed += 1

    async def _on_session_end(self, command: Command) -> None:
        phone = self.phones.get(int(command["organizationPhoneId"]))
        if phone is None or phone.logged_out_until is not None:
            return
        self.stats.logouts_obeyed += 1
        self.stats.faults_logged_out += phone.outstanding_faults
        phone.logged_out_until = time.monotonic() + self.config.rescan_seconds
        self._flapping.pop(phone.phone_id, None)

    async def _rescan(self, phone: SimPhone) -> None:
        """The customer scanned the QR code: new credentials, new sessions, a new login."""
        phone.logged_out_until = None
        phone.reset_keys()
        self._logins[phone.phone_id] = self._logins.get(phone.phone_id, 0) + 1
        self.stats.rescans += 1
        await self._client(phone).send(connection_update(*phone.ids, "open", new_login=True))
