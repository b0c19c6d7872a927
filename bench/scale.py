"""Fleet mode at internet scale: N sessions over R replica processes on one PostgreSQL (issue 30).

    python -m bench.scale [--sessions 100000] [--replicas 4] [--idle-seconds 60] [--storm-phones 1000]
                          [--storm-rounds 3] [--compare-replicas 2]

Real `wa-sidecar serve` processes in fleet mode on a fresh database of the local PostgreSQL; each replica gets
runtime connections (raw WebSocket, `runtime.info` with a runtime id, events with a `seq`, every command acked) that
carry its share of the phones. Phases, each measured from PostgreSQL's own statistics (rows written: inserts,
updates and deletes of the sidecar schema's tables in `pg_stat_user_tables`; commits of the database in
`pg_stat_database`; WAL bytes from `pg_current_wal_lsn()` deltas):

- claim: every runtime reports `open` for its phones in frames of 500, as after a fleet restart; the time until
  every session is owned (`socket_owners`);
- idle: each session sends an activity report every 30 s (spread evenly), for --idle-seconds;
- storm: 3 Bad MAC errors for each of --storm-phones phones, spread over the replicas; events decided per second,
  and every phone closed exactly once (counted in `closures`); --storm-rounds times on fresh phones (the median
  kept), each with the CPU the replicas, PostgreSQL and this client used (cores busy, from /proc);
- takeover: one replica SIGKILLed; its runtimes reconnect to the others and report each session once; the time
  until every phone it held has a new owner, and whether any command was delivered twice.

Schema bytes per session: `pg_total_relation_size` of every table of the sidecar schema (indexes and TOAST
included) over the sessions, after the claim (open and idle). With --compare-replicas K the storm phase runs again
on K replicas (same sessions, a fresh database), and the two event rates are compared. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.common import Phone, free_port, seeded_database
from tests.monitoring import wait_ready

FRAME = 500
COMMANDS = {"session.end", "auth.clear", "session.probe", "session.restart"}


@dataclass
class Runtime:
    """One runtime process's link: its phones, its seq, and every command it was sent (acked at once)."""

    name: str
    phones: list[Phone]
    seq: int = 0
    ws: ClientConnection | None = None
    commands: collections.Counter[str] = field(default_factory=collections.Counter)
    reader: asyncio.Task[None] | None = None

    async def connect(self, url: str) -> None:
        self.ws = await connect(url, max_size=None, ping_interval=None)
        await self.ws.send(json.dumps({"type": "runtime.info", "runtimeId": self.name}))
        self.reader = asyncio.create_task(self._read(self.ws))

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for data in ws:
                message = json.loads(data)
                for item in message if isinstance(message, list) else [message]:
                    if item.get("type") in COMMANDS:
                        self.commands[item["commandId"]] += 1
                        await ws.send(json.dumps({"type": "command.ack", "commandId": item["commandId"], "ok": True}))

    async def send(self, events: list[dict[str, Any]]) -> None:
        assert self.ws is not None
        for start in range(0, len(events), FRAME):
            frame = []
            for event in events[start : start + FRAME]:
                self.seq += 1
                frame.append({**event, "seq": self.seq})
            await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()


def event(kind: str, phone: Phone, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "organizationId": phone.organization_id, "organizationPhoneId": phone.organization_phone_id,
            "phoneJid": phone.jid, **extra}  # fmt: skip


def activity(phone: Phone) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return event("activity", phone, messages=1, receipts=2, notifications=0, lastInboundAt=now)


@dataclass
class Replica:
    name: str
    process: asyncio.subprocess.Process
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/runtime"


@asynccontextmanager
async def fleet(database: str, count: int) -> AsyncIterator[list[Replica]]:
    migrate = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", "migrate", "--database-url",
                                                   database, stdout=asyncio.subprocess.DEVNULL)  # fmt: skip
    assert await migrate.wait() == 0
    replicas: list[Replica] = []
    for index in range(count):
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", "--listen", f"127.0.0.1:{port}", "--database-url", database,
            "--instance", f"scale-{index}", "--log-level", "ERROR", "--breaker-max-closes", "1000000",
        )  # fmt: skip
        replicas.append(Replica(f"scale-{index}", process, port))
    try:
        for replica in replicas:
            await wait_ready(f"http://127.0.0.1:{replica.port}/readyz", replica.process)
        yield replicas
    finally:
        for replica in replicas:
            if replica.process.returncode is None:
                replica.process.terminate()
        for replica in replicas:
            await replica.process.wait()


@dataclass(frozen=True)
class Snapshot:
    at: float
    rows: int
    commits: int
    wal: int


async def snapshot(db: asyncpg.Connection) -> Snapshot:
    rows = await db.fetchval(
        "SELECT COALESCE(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables "
        "WHERE schemaname = 'wa_sidecar'"
    )
    commits = await db.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    wal = await db.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    return Snapshot(time.monotonic(), int(rows), int(commits), int(wal))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (/proc/PID/stat; clock ticks of 1/100 s)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on the machine (the benchmark's database shares the local cluster)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as comm:
                if comm.read().strip() == "postgres":
                    pids.append(int(entry))
    return pids


def rates(before: Snapshot, after: Snapshot) -> dict[str, float]:
    seconds = after.at - before.at
    return {
        "rows_per_s": (after.rows - before.rows) / seconds,
        "commits_per_s": (after.commits - before.commits) / seconds,
        "wal_bytes_per_s": (after.wal - before.wal) / seconds,
        "seconds": seconds,
    }


def show(phase: str, measured: dict[str, float], replicas: int, extra: str = "") -> None:
    line = (
        f"  {phase:<9} rows written/s {measured['rows_per_s']:>9.1f} ({measured['rows_per_s'] / replicas:.1f} per "
        f"replica)   commits/s {measured['commits_per_s']:>8.1f}   WAL {measured['wal_bytes_per_s'] / 1024:>8.1f} "
        f"KB/s   over {measured['seconds']:.1f} s{extra}"
    )
    print(line, flush=True)


async def until(check: Any, deadline: float, step: float = 0.25) -> float:
    """Seconds until `check()` is true (polled); raises past `deadline` seconds."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > deadline:
            raise TimeoutError("not within the deadline")
        await asyncio.sleep(step)
    return time.monotonic() - started


async def claim(db: asyncpg.Connection, fleet_: list[Replica], runtimes: list[Runtime], sessions: int) -> float:
    for index, runtime in enumerate(runtimes):
        await runtime.connect(fleet_[index % len(fleet_)].ws_url)
    started = time.monotonic()
    await asyncio.gather(*(runtime.send([event("connection.update", p, connection="open") for p in runtime.phones])
                           for runtime in runtimes))  # fmt: skip

    async def owned() -> bool:
        return int(await db.fetchval("SELECT count(*) FROM wa_sidecar.socket_owners")) >= sessions

    await until(owned, 600)
    return time.monotonic() - started


async def idle_traffic(runtimes: list[Runtime], stop: asyncio.Event) -> None:
    """Each session's activity report every 30 s, spread: every second, a thirtieth of each runtime's phones."""
    tick = 0
    while not stop.is_set():
        for runtime in runtimes:
            share = runtime.phones[tick % 30 :: 30]
            with contextlib.suppress(ConnectionClosed):  # its replica was just killed: it is reconnecting
                await runtime.send([activity(phone) for phone in share])
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def storm(db: asyncpg.Connection, runtimes: list[Runtime], phones: int, round_: int) -> tuple[float, int, int]:
    """3 Bad MACs for `phones` phones (spread over the runtimes; each round its own phones); (events/s, phones
    closed so far, phones closed twice)."""
    share = max(1, phones // len(runtimes))
    chosen = [runtime.phones[round_ * share : (round_ + 1) * share] for runtime in runtimes]
    total = sum(len(group) for group in chosen)
    before = int(await db.fetchval("SELECT count(*) FROM wa_sidecar.closures"))
    started = time.monotonic()
    frames = [
        (runtime, [event("decrypt.error", phone, error="Bad MAC", source="message") for phone in group])
        for runtime, group in zip(runtimes, chosen, strict=True)
    ]
    for _ in range(3):
        await asyncio.gather(*(runtime.send(events) for runtime, events in frames))

    async def closed() -> bool:
        return int(await db.fetchval("SELECT count(*) FROM wa_sidecar.closures")) >= before + total

    await until(closed, 600, 0.05)
    seconds = time.monotonic() - started
    twice = int(await db.fetchval(
        "SELECT count(*) FROM (SELECT organization_phone_id FROM wa_sidecar.closures GROUP BY 1 HAVING count(*) > 1) d"
    ))  # fmt: skip
    closures = int(await db.fetchval("SELECT count(DISTINCT organization_phone_id) FROM wa_sidecar.closures"))
    return 3 * total / seconds, closures, twice


async def schema_bytes(db: asyncpg.Connection) -> int:
    return int(await db.fetchval(
        "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'wa_sidecar' AND c.relkind = 'r'"
    ))  # fmt: skip


async def table_bytes(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'wa_sidecar' AND c.relkind = 'r' ORDER BY 2 DESC"
    )
    return {row["relname"]: int(row["bytes"]) for row in rows}


async def run(
    sessions: int, replica_count: int, idle_seconds: float, storm_phones: int, rounds: int, full: bool
) -> float:
    """One fleet; prints each phase; returns the storm's events/s."""
    print(f"{sessions:,} sessions over {replica_count} replicas, {os.cpu_count()} cores")
    connections_per_replica = 2
    count = replica_count * connections_per_replica
    async with seeded_database(sessions) as (dsn, phones), fleet(dsn, replica_count) as replicas:
        runtimes = [Runtime(f"runtime-{i}", phones[i::count]) for i in range(count)]
        db = await asyncpg.connect(dsn)
        try:
            before = await snapshot(db)
            claimed = await claim(db, replicas, runtimes, sessions)
            await asyncio.sleep(2)  # the statistics of the last claims flushed
            show("claim", rates(before, await snapshot(db)), replica_count,
                 f"   every session owned after {claimed:.1f} s")  # fmt: skip
            stop = asyncio.Event()
            traffic = asyncio.create_task(idle_traffic(runtimes, stop))
            await asyncio.sleep(min(15.0, idle_seconds / 4))  # past the claims' tail and the first reports
            if full:
                before = await snapshot(db)
                await asyncio.sleep(idle_seconds)
                show("idle", rates(before, await snapshot(db)), replica_count)
                total = await schema_bytes(db)
                largest = ", ".join(
                    f"{name} {size / sessions:.0f}" for name, size in list((await table_bytes(db)).items())[:4]
                )
                print(f"  schema    {total / sessions:,.0f} bytes per open idle session ({largest})")
            rate = await storm_rounds(db, replicas, runtimes, storm_phones, rounds)
            if full and replica_count > 1:
                await takeover(db, replicas, runtimes, replica_count)
            stop.set()
            await traffic
        finally:
            for runtime in runtimes:
                await runtime.close()
            await db.close()
    return rate


async def storm_rounds(
    db: asyncpg.Connection, replicas: list[Replica], runtimes: list[Runtime], phones: int, rounds: int
) -> float:
    """The storm `rounds` times on fresh phones, each round's figures printed (with the cores each side kept busy:
    on a machine whose cores are all busy, the rate is the machine's, not the coordination's); the median rate."""
    sidecar_pids = [replica.process.pid for replica in replicas]
    results = []
    for round_ in range(rounds):
        before = await snapshot(db)
        cpu_before = (cpu_seconds(sidecar_pids), cpu_seconds(postgres_pids()), time.process_time())
        rate, closures, twice = await storm(db, runtimes, phones, round_)
        measured = rates(before, await snapshot(db))
        cpu = (cpu_seconds(sidecar_pids), cpu_seconds(postgres_pids()), time.process_time())
        busy = [(after - start) / measured["seconds"] for start, after in zip(cpu_before, cpu, strict=True)]
        show(f"storm {round_ + 1}", measured, len(replicas),
             f"   {rate:,.0f} events decided/s, {closures} phones closed so far, {twice} closed twice; cores busy: "
             f"replicas {busy[0]:.2f}, PostgreSQL {busy[1]:.2f}, this client {busy[2]:.2f}")  # fmt: skip
        results.append(rate)
    median = sorted(results)[len(results) // 2]
    print(f"  storm     median of {rounds} rounds: {median:,.0f} events decided/s", flush=True)
    return median


async def takeover(db: asyncpg.Connection, replicas: list[Replica], runtimes: list[Runtime], count: int) -> None:
    victim = replicas[0]
    moved = [runtime for index, runtime in enumerate(runtimes) if index % count == 0]
    instance = await db.fetchval(
        "SELECT instance FROM wa_sidecar.replica_leases WHERE instance LIKE $1 || '/%'", victim.name
    )
    held = int(await db.fetchval("SELECT count(*) FROM wa_sidecar.socket_owners WHERE instance = $1", instance))
    before = await snapshot(db)
    victim.process.send_signal(signal.SIGKILL)
    await victim.process.wait()
    started = time.monotonic()
    for index, runtime in enumerate(moved):
        await runtime.close()
        await runtime.connect(replicas[1 + index % (count - 1)].ws_url)
        await runtime.send([activity(phone) for phone in runtime.phones])  # each session reported once

    async def all_moved() -> bool:
        left = await db.fetchval("SELECT count(*) FROM wa_sidecar.socket_owners WHERE instance = $1", instance)
        return int(left) == 0

    await until(all_moved, 300)
    seconds = time.monotonic() - started
    twice = sum(1 for runtime in runtimes for times in runtime.commands.values() if times > 1)
    show("takeover", rates(before, await snapshot(db)), count,
         f"   {held:,} phones of the killed replica owned again after {seconds:.1f} s "
         f"(lease 15 s), {twice} commands delivered twice")  # fmt: skip


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--storm-phones", type=int, default=1000)
    parser.add_argument("--storm-rounds", type=int, default=3, help="storms on fresh phones; the median is kept")
    parser.add_argument("--compare-replicas", type=int, default=0, help="run the storm again on this many")
    args = parser.parse_args(argv)
    common = (args.idle_seconds, args.storm_phones, args.storm_rounds)
    rate = await run(args.sessions, args.replicas, *common, full=True)
    if args.compare_replicas:
        other = await run(args.sessions, args.compare_replicas, *common, full=False)
        print(f"storm: {args.replicas} replicas decide {rate / other:.2f}x the events/s of {args.compare_replicas}")


if __name__ == "__main__":
    asyncio.run(main())
