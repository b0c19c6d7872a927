"""`wa-sidecar ingest-logs`: the zero-code path. A Baileys backend's log feeds the runtime in-process."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import yaml

from sidecar.components import Components
from sidecar.ingest.baileys_log import BaileysLogReader, SessionMap
from sidecar.ingest.source import file_lines, stdin_lines
from sidecar.link.dispatch import apply_event
from sidecar.link.protocol import CommandAck, FrameInvalid, parse_messages
from sidecar.rules.classification import ErrorSource, classify

log = logging.getLogger("sidecar.ingest")


class SessionMapError(ValueError):
    pass


def load_session_map(path: Path) -> SessionMap:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SessionMapError(f"{path}: {error}") from None
    try:
        return SessionMap.from_document(document)
    except ValueError as error:
        raise SessionMapError(f"{path}: {error}") from None


def lines_of(source: str, follow: bool, from_end: bool) -> AsyncIterator[str]:
    return stdin_lines() if source == "-" else file_lines(Path(source), follow, from_end)


async def pump(components: Components, lines: AsyncIterator[str], reader: BaileysLogReader) -> dict[str, object]:
    """Feeds every event the log holds to the runtime; returns what it read. Waits when the pending queue is full
    (apply_event waits for room), so a fast log slows down instead of growing memory."""
    if not components.restored.is_set():
        log.warning("waiting for the stored counters to load before reading the log (failures are logged)")
        await components.restored.wait()
    started = time.perf_counter()
    by_class: Counter[str] = Counter()
    async for chunk in lines:
        for event in reader.feed(chunk):
            if event["type"] == "decrypt.error":
                source = event.get("source")
                by_class[classify(str(event["error"]), ErrorSource(source) if source else None)] += 1
            await _apply(components, event)
        await asyncio.sleep(0)  # a chunk is at most 1 MB of log: yield so the API stays responsive
    await components.runtime.settle()
    seconds = time.perf_counter() - started
    stats = asdict(reader.stats)
    rate = round(reader.stats.lines / seconds) if seconds else 0
    return stats | {"decryptErrors": dict(by_class), "seconds": round(seconds, 3), "linesPerSecond": rate}


async def _apply(components: Components, event: dict[str, object]) -> None:
    try:
        messages = parse_messages(event)
    except FrameInvalid as invalid:
        components.link.rejected(invalid.reason)
        log.warning("log event refused", extra={"fields": {"error": invalid.error, "details": invalid.details}})
        return
    async with components.runtime.batch():
        for message in messages:
            components.link.counted_all((message,), "logs")
            if not isinstance(message, CommandAck):
                await apply_event(components.runtime, message)


def announce(source: str, follow: bool) -> None:
    log.warning(
        "ingest-logs: observing a Baileys log; commands cannot be delivered on this path",
        extra={
            "fields": {
                "source": "stdin" if source == "-" else source,
                "follow": follow,
                "note": "errors are counted, alerted, notified and the database is updated, but no socket is "
                "ended and no cached key is dropped in the runtime; use the runtime link (adapter) for that",
            }
        },
    )


def summary_line(stats: dict[str, object]) -> str:
    return json.dumps({"ingest": stats})
