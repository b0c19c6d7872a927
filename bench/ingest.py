"""Ingest over the runtime link: events/s, one event per frame and batched, side by side with a bare aiohttp
WebSocket sink (parses each frame as JSON and counts: the ceiling of this stack), same client, same run; then
event -> decision latency at a fixed rate.

    python -m bench.ingest [--connections 4] [--events 200000] [--batch 100] [--rate 10000] [--runs 3]
                           [--mix counted|reconnect]

- The sidecar is measured three times in each run: plain frames, frames whose events carry a `seq` after a
  `runtime.info` (what the SDK and the Baileys adapter send: the sidecar tracks the sequence and acknowledges),
  and frames whose every error carries a distinct `messageId` (each one tracked as a pending message until it is
  recovered or lost: rules/loss.py).

- Servers are separate processes: `wa-sidecar serve` (embedded store, no tracing exporter) and `bench.sink`.
- The client (`websockets`, one asyncio task per connection) sends pre-built frames as fast as it can; the run
  ends when the server has counted every event (the sidecar's whatsapp_sidecar_events_total, the sink's /count).
  Events: decrypt errors of a counted-only class ("No session record") over 1,000 sessions, each connection
  reporting its own 1,000 / connections of them, so each event is validated, classified, counted and applied
  without database work. `--mix reconnect` is a reconnect flood: every other event is a `connection.update`
  `open` of the same phones (each open is decided: counters reset, liveness and the socket's state), the rest
  counted-only errors.
- Latency: at `--rate` events/s, every 100th event is a Bad MAC for a fresh session; its heal decision comes back
  as an `auth.clear` command on the same connection. Send -> command received is event -> decision -> command,
  an upper bound of event -> decision.
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.common import free_port

SESSIONS = 1000
PROBE_BASE = 100_000


def event(phone: int, error: str = "No session record") -> dict[str, object]:
    return {"type": "decrypt.error", "organizationId": 1 + phone % 20, "organizationPhoneId": phone,
            "phoneJid": f"7900{phone:07d}@s.whatsapp.net", "error": error}  # fmt: skip


def frames(total: int, batch: int, connection: int, connections: int, seq: bool = False) -> list[str]:
    """Each connection reports its own phones (SESSIONS / connections of them), as a runtime process owns its
    sessions; phones shared by connections would measure ownership changing hands on every event."""
    share = SESSIONS // connections
    events = [event(1 + connection * share + index % share) for index in range(total)]
    return _framed(events, batch, seq)


def reconnect_frames(total: int, batch: int, connection: int, connections: int, seq: bool = False) -> list[str]:
    """A reconnect flood: every other event an `open` of the connection's phones, the rest counted-only errors."""
    share = SESSIONS // connections
    events = [
        opened(phone) if index % 2 else event(phone)
        for index in range(total)
        for phone in [1 + connection * share + (index // 2) % share]
    ]
    return _framed(events, batch, seq)


def opened(phone: int) -> dict[str, object]:
    return {"type": "connection.update", "organizationId": 1 + phone % 20, "organizationPhoneId": phone,
            "phoneJid": f"7900{phone:07d}@s.whatsapp.net", "connection": "open"}  # fmt: skip


def _framed(events: list[dict[str, object]], batch: int, seq: bool) -> list[str]:
    if seq:
        events = [{**item, "seq": index} for index, item in enumerate(events, start=1)]
    if batch <= 1:
        return [json.dumps(item) for item in events]
    return [json.dumps(events[start : start + batch]) for start in range(0, len(events), batch)]


@asynccontextmanager
async def server(argv: list[str], port: int) -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(base + ("/healthz" if "sidecar" in argv else "/count")) as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv} did not start")
                await asyncio.sleep(0.05)
        yield base
    finally:
        process.terminate()
        await process.wait()


MARKER_BASE = 900_000
_markers = iter(range(MARKER_BASE, MARKER_BASE + 1_000_000))


async def sink_count(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(base + "/count") as response:
        return int((await response.json())["events"])


async def marker_applied(http: aiohttp.ClientSession, base: str, phone: int) -> bool:
    async with http.get(f"{base}/v1/sessions/{phone}/stats") as response:
        return response.status == 200 and (await response.json())["badMacErrors"] >= 1


_runtime_ids = iter(range(1, 1_000_000))


Frames = Callable[[int, int, int, int, bool], list[str]]  # (events, batch, connection, connections, seq)


async def throughput(
    base: str, sidecar: bool, connections: int, total: int, batch: int, seq: bool = False, build: Frames | None = None
) -> float:
    """Events/s until the server has taken every event: the sink's count, or, for the sidecar, each connection's
    final marker (a Bad MAC of a fresh session) applied; a connection's frames are applied in order. `build`
    makes each connection's frames (default: `frames`)."""
    per_connection = total // connections
    prepared = [(build or frames)(per_connection, batch, index, connections, seq) for index in range(connections)]
    markers = [next(_markers) for _ in range(connections)]
    if sidecar:
        for items, marker in zip(prepared, markers, strict=True):
            last = {**event(marker, "Bad MAC"), "seq": per_connection + 1} if seq else event(marker, "Bad MAC")
            items.append(json.dumps(last))
            if seq:
                items.insert(0, json.dumps({"type": "runtime.info", "runtimeId": f"bench-{next(_runtime_ids)}"}))
    url = base.replace("http://", "ws://") + "/v1/runtime"
    async with aiohttp.ClientSession() as http:
        before = 0 if sidecar else await sink_count(http, base)
        sockets = [await connect(url, max_size=None, compression=None) for _ in range(connections)]

        async def discard(ws: ClientConnection) -> None:  # acks and commands: read, so the link never backs up
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass

        readers = [asyncio.create_task(discard(ws)) for ws in sockets]
        try:
            started = time.perf_counter()

            async def pump(ws: ClientConnection, items: list[str]) -> None:
                for frame in items:
                    await ws.send(frame)

            await asyncio.gather(*(pump(ws, items) for ws, items in zip(sockets, prepared, strict=True)))
            if sidecar:
                for marker in markers:
                    while not await marker_applied(http, base, marker):  # noqa: ASYNC110 - polling another process
                        await asyncio.sleep(0.002)
            else:
                while await sink_count(http, base) < before + per_connection * connections:  # noqa: ASYNC110
                    await asyncio.sleep(0.002)
            elapsed = time.perf_counter() - started
        finally:
            for ws in sockets:
                await ws.close()
            for reader in readers:
                reader.cancel()
    return per_connection * connections / elapsed


async def latency(base: str, connections: int, rate: float, seconds: float) -> list[float]:
    """Event -> decision -> command round trips (ms) of Bad MAC probes sent among a steady `rate` of events."""
    url = base.replace("http://", "ws://") + "/v1/runtime"
    sent: dict[int, float] = {}
    received: dict[int, float] = {}
    sockets = [await connect(url, max_size=None, compression=None) for _ in range(connections)]

    async def listen(ws: ClientConnection) -> None:
        async for raw in ws:
            now = time.perf_counter()
            text = raw if isinstance(raw, str) else raw.decode()
            for command in [*json.loads(text)] if text.startswith("[") else [json.loads(text)]:
                if command.get("type") == "auth.clear":
                    received.setdefault(int(command["organizationPhoneId"]), now)
                if "commandId" in command:
                    ack = {"type": "command.ack", "commandId": command["commandId"], "ok": True, "error": None}
                    await ws.send(json.dumps(ack))

    listeners = [asyncio.create_task(listen(ws)) for ws in sockets]
    sequence, probe = 0, 0
    share = SESSIONS // connections
    started = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - started) < seconds:
            while sequence < rate * elapsed:  # paced by the clock: the rate holds whatever a loop turn costs
                ws = sockets[sequence % connections]
                if sequence % 100 == 0:
                    probe += 1
                    phone = PROBE_BASE + probe
                    sent[phone] = time.perf_counter()
                    await ws.send(json.dumps(event(phone, "Bad MAC")))
                else:
                    owned = 1 + (sequence % connections) * share + sequence // connections % share
                    await ws.send(json.dumps(event(owned)))  # each connection its own phones, as in throughput()
                sequence += 1
            await asyncio.sleep(0.001)
        deadline = time.perf_counter() + 10
        while len(received) < len(sent) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        achieved = sequence / (time.perf_counter() - started)
        print(f"  (sent {sequence} events in {seconds:.0f} s = {achieved:,.0f}/s; {len(received)}/{len(sent)} probes)")
    finally:
        for task in listeners:
            task.cancel()
        for ws in sockets:
            await ws.close()
    return [1000 * (received[phone] - sent[phone]) for phone in sent if phone in received]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


MIXES: dict[str, Frames] = {"counted": frames, "reconnect": reconnect_frames}
_message_ids = iter(range(1, 1 << 62))


def with_message_ids(build: Frames) -> Frames:
    """The same frames, every decrypt error with a messageId never used before (a message that failed)."""

    def built(total: int, batch: int, connection: int, connections: int, seq: bool) -> list[str]:
        framed = [json.loads(frame) for frame in build(total, batch, connection, connections, seq)]
        for items in framed:
            for item in items if isinstance(items, list) else [items]:
                if item["type"] == "decrypt.error":
                    item["messageId"] = f"3EB0{next(_message_ids):016X}"
        return [json.dumps(items) for items in framed]

    return built


async def run(connections: int, events: int, batch: int, rate: float, runs: int, mix: str = "counted") -> None:
    sidecar_port, sink_port = free_port(), free_port()
    sidecar_argv = [sys.executable, "-m", "sidecar", "serve", "--listen", f"127.0.0.1:{sidecar_port}",
                    "--log-level", "ERROR"]  # fmt: skip
    sink_argv = [sys.executable, "-m", "bench.sink", "--port", str(sink_port)]
    results: dict[tuple[str, int], list[float]] = {}
    async with server(sidecar_argv, sidecar_port) as sidecar, server(sink_argv, sink_port) as sink:
        for _ in range(runs):
            for size in (1, batch):
                measured = (("sidecar", sidecar), ("sidecar+seq", sidecar), ("sidecar+ids", sidecar), ("sink", sink))
                for name, base in measured:
                    count = events if size > 1 else events // 4
                    build = with_message_ids(MIXES[mix]) if name == "sidecar+ids" else MIXES[mix]
                    results.setdefault((name, size), []).append(
                        await throughput(
                            base, name != "sink", connections, count, size, seq=name == "sidecar+seq", build=build
                        )
                    )
        print(f"ingest: {connections} connections, the {mix} mix, medians of {runs} runs (events/s)")
        for size in (1, batch):
            mine, ceiling = statistics.median(results[("sidecar", size)]), statistics.median(results[("sink", size)])
            label = "one event per frame" if size == 1 else f"batches of {size}"
            print(f"  {label:>20}: sidecar {mine:>10,.0f}   bare sink {ceiling:>10,.0f}   ratio {mine / ceiling:.2f}x")
            sequenced = statistics.median(results[("sidecar+seq", size)])
            print(f"  {'':>20}  with seq {sequenced:>9,.0f}   {sequenced / mine:.2f}x the sidecar without seq")
            ids = statistics.median(results[("sidecar+ids", size)])
            print(f"  {'':>20}  with messageId {ids:>9,.0f}   {ids / mine:.2f}x the sidecar without")
        samples = await latency(sidecar, connections, rate, seconds=5)
    if samples:
        print(f"  event -> decision -> command at {rate:,.0f} events/s: {len(samples)} probes, "
              f"p50 {statistics.median(samples):.2f} ms, p99 {percentile(samples, 0.99):.2f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mix", choices=sorted(MIXES), default="counted", help="counted-only errors, or half opens")
    args = parser.parse_args()
    asyncio.run(run(args.connections, args.events, args.batch, args.rate, args.runs, args.mix))


if __name__ == "__main__":
    main()
