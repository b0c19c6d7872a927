"""Structured JSON logs: one object per line, with the fields an action attached, and inside a span its
`trace_id` and `span_id` (the OpenTelemetry logging convention), so a close seen in a trace backend joins its
log lines."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry import trace


class TraceContext(logging.Filter):
    """Stamps each record with the active span's ids (hex, as trace backends print them), if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class MalformedRequests(logging.Filter):
    """A request aiohttp's parser refuses (bad bytes in a header or the URL) is answered 400 by aiohttp itself; it
    is the client's error, so it is logged as one warning line, not an error with a traceback a client could fill
    the log with."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args, record.exc_info = "malformed HTTP request refused (%s): %s", (
                error.code, str(error.message).split("\n", 1)[0].strip(),
            ), None  # fmt: skip
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (trace_id := getattr(record, "trace_id", None)) is not None:
            entry["trace_id"] = trace_id
            entry["span_id"] = getattr(record, "span_id", None)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    """The sidecar's log handler: JSON lines, trace-correlated."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContext())
    return handler


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    handler = json_handler(stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(known, MalformedRequests) for known in server.filters):
        server.addFilter(MalformedRequests())
