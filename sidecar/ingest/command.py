"""`wa-sidecar ingest-logs`: the zero-code path. A Baileys backend's log feeds the runtime in-process."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path

import yaml

from sidecar.components import Components
from sidecar.events.decode import decode_objects
from sidecar.events.intake import Channel
from sidecar.events.reader import FrameInvalid
from sidecar.events.schema import DecryptError, InboundMessage
from sidecar.ingest.baileys_log import BaileysLogReader, SessionMap
from sidecar.ingest.source import file_lines, stdin_lines
from sidecar.ports import SocketLeftToRuntime

log = logging.getLogger("sidecar.ingest")

BATCH = 1000  # events of the log handed to the intake at once (a chunk of the log can hold more)


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


UNATTRIBUTED_RECIPE = (
    "log through a pino child logger with all three bindings, pino().child({ organizationId, "
    "organizationPhoneId, phoneJid }), or map a binding you have with --sessions (docs/quickstart/logs.md)"
)


class IngestRun:
    """One read of a log: what it counted so far, said as a summary line at its end (also when stopped)."""

    def __init__(self, reader: BaileysLogReader) -> None:
        self.reader = reader
        self.by_class: Counter[str] = Counter()
        self.started = time.perf_counter()

    def summary(self) -> dict[str, object]:
        seconds = time.perf_counter() - self.started
        rate = round(self.reader.stats.lines / seconds) if seconds else 0
        stats = asdict(self.reader.stats)
        return stats | {"decryptErrors": dict(self.by_class), "seconds": round(seconds, 3), "linesPerSecond": rate}


async def pump(components: Components, lines: AsyncIterator[str], run: IngestRun) -> dict[str, object]:
    """Feeds every event the log holds to the intake, a batch at a time; returns what it read. The intake waits
    while the database writer is behind, so a fast log slows down instead of growing memory."""
    if not components.restored.is_set():
        log.warning("waiting for the stored counters to load before reading the log (failures are logged)")
        await components.restored.wait()
    reader, by_class, hinted = run.reader, run.by_class, False
    async for chunk in lines:
        events = reader.feed(chunk)
        if not hinted and reader.unattributed_hint is not None:
            hinted = True
            log.warning("a log line names no session and is not counted: %s; %s (said once; the summary counts "
                        "them as unattributed)", reader.unattributed_hint, UNATTRIBUTED_RECIPE)  # fmt: skip
        for start in range(0, len(events), BATCH):
            messages = _decoded(components, events[start : start + BATCH])
            for message in messages:
                if type(message) is DecryptError:
                    by_class[components.runtime.error_class(message)] += 1
            if messages:
                await components.intake.take(messages, Channel.LOGS)
        await asyncio.sleep(0)  # a chunk is at most 1 MB of log: yield so the API stays responsive
    await components.runtime.settle()
    return run.summary()


def _decoded(components: Components, events: list[dict[str, object]]) -> list[InboundMessage]:
    """The batch's events; one the reader refuses is logged and left out, the others go on."""
    try:
        return decode_objects(events)
    except FrameInvalid as invalid:
        refused = {problem["index"] for problem in invalid.details}
        for index in sorted(refused):
            components.intake.rejected(invalid.reason)
            problems = [problem for problem in invalid.details if problem["index"] == index]
            log.warning("log event refused", extra={"fields": {"error": invalid.error, "details": problems}})
        if not refused:  # the batch as a whole (none of a log's batches is empty or too long)
            components.intake.rejected(invalid.reason)
            return []
        return decode_objects([event for index, event in enumerate(events) if index not in refused])


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


class LogOnlySockets:
    """The SocketController of `ingest-logs`: there is no runtime link, so a close or heal leaves the socket and
    the cached keys to the backend (its outcome says `left_to_runtime`, not a failure)."""

    async def end_session(self, organization_phone_id: int, reason: str, detail: str) -> int | None:
        raise SocketLeftToRuntime("ingest-logs reads a log; the backend ends its own socket")

    async def clear_cached_keys(self, organization_phone_id: int, key_prefixes: Sequence[str]) -> int | None:
        raise SocketLeftToRuntime("ingest-logs reads a log; the backend drops its own cached keys")
