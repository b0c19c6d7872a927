"""OpenTelemetry tracing: one tracer name, Resource.create(), exporters only from the standard OTEL_* variables.

With no exporter configured the sidecar uses the API's no-op tracer, so the per-event cost of tracing is a
few attribute-free calls. `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) turns on OTLP over HTTP
with a BatchSpanProcessor; it needs the `otlp` extra (opentelemetry-exporter-otlp-proto-http).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from sidecar import __version__

TRACER_NAME = "whatsapp-session-sidecar"
SERVICE = "whatsapp-session-sidecar"


class TracingUnavailable(RuntimeError):
    pass


@dataclass
class Tracing:
    tracer: trace.Tracer
    provider: TracerProvider | None = None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


# The standard variables this module acts on (docs/reference/configuration.md lists them; the SDK reads more).
OTEL_VARIABLES = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "turns tracing on: spans go there by OTLP over HTTP (needs the `otlp` extra)",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "the same, for traces only",
    "OTEL_TRACES_EXPORTER": "`none` turns tracing off even with an endpoint",
    "OTEL_SDK_DISABLED": "`true` turns tracing off",
    "OTEL_SERVICE_NAME": "the service name on spans (default whatsapp-session-sidecar)",
    "OTEL_RESOURCE_ATTRIBUTES": "extra resource attributes (k=v,k=v), over the defaults",
}


def no_tracing() -> Tracing:
    return Tracing(trace.NoOpTracerProvider().get_tracer(TRACER_NAME))


def tracing_from_provider(provider: TracerProvider) -> Tracing:
    return Tracing(provider.get_tracer(TRACER_NAME, __version__), provider)


def tracing_from_env(env: Mapping[str, str]) -> Tracing:
    wanted = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if (
        not wanted
        or env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none"
        or env.get("OTEL_SDK_DISABLED") == "true"
    ):
        return no_tracing()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        raise TracingUnavailable(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: "
            "pip install 'whatsapp-session-sidecar[otlp]'"
        ) from error
    provider = TracerProvider(resource=resource())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return tracing_from_provider(provider)


def resource() -> Resource:
    # Resource.create() also reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win over these defaults.
    return Resource.create({SERVICE_NAME: SERVICE, SERVICE_VERSION: __version__})
