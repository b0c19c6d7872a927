"""How an effect went, in the words the closure record, the logs and the spans use: socket-command outcomes
('ended', 'unreachable', 'timeout', 'left_to_runtime', 'failed: …') and the span helpers that mark a failed step."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.ports import SocketCommandFailed, SocketLeftToRuntime, SocketUnreachable
from sidecar.rules.records import PhoneRef, StepOutcome

LEFT_TO_RUNTIME = "left_to_runtime"  # log mode: no command can be sent; the backend handles its socket itself


async def socket_command(command: Awaitable[object], done: str, wait_seconds: float) -> str:
    """Run a command to the messenger runtime and say how it went; never raises."""
    return (await socket_answer(command, done, wait_seconds))[0]


async def socket_answer(command: Awaitable[object], done: str, wait_seconds: float) -> tuple[str, int | None]:
    """... and the keys the runtime said it deleted (its ack's `keysDeleted`), if it said."""
    try:
        answer = await asyncio.wait_for(command, wait_seconds)
    except SocketLeftToRuntime:
        return LEFT_TO_RUNTIME, None
    except SocketUnreachable:
        return "unreachable", None
    except TimeoutError:
        return "timeout", None
    except SocketCommandFailed as error:
        return f"{StepOutcome.FAILED}: {error}", None
    except Exception as error:
        return f"{StepOutcome.FAILED}: {type(error).__name__}: {error}", None
    return done, answer if isinstance(answer, int) and not isinstance(answer, bool) else None


def span_ids(phone: PhoneRef) -> dict[str, int]:
    return {
        "whatsapp.organization_id": phone.organization_id,
        "whatsapp.organization_phone_id": phone.organization_phone_id,
    }


def fail_span(span: Span, outcome: str) -> None:
    """Mark a span failed; `outcome` looks like 'failed: RaiseError: …', 'timeout' or 'unreachable'."""
    parts = outcome.split(": ")
    error_type = parts[1] if parts[0] == StepOutcome.FAILED and len(parts) > 2 else parts[0]
    span.set_status(Status(StatusCode.ERROR, outcome))
    span.set_attribute("error.type", error_type)


_PROPAGATOR = TraceContextTextMapPropagator()


def context_from_traceparent(traceparent: str | None) -> Context | None:
    """The W3C trace context a runtime sent with an event, so the sidecar's spans join that trace."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})
