"""Traces: OpenTelemetry spans of one request across the bridge, the gateway, a worker and an
upstream engine, exported over OTLP/gRPC. Off by default ([Operations](../docs/operations.md#traces)).

A part traces when it is given ``--otlp-traces-endpoint``, or when the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set;
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off. The rest is the SDK's own
standard settings: ``OTEL_SERVICE_NAME`` (default ``tokenwire-<part>``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``; the W3C trace context
(``traceparent``) in and out.

Each part has its own tracer provider, so that it reports as its own service also where two
share a process (serve's front end). The maintained instrumentations make the hops' spans (the
bridge's HTTP server span is FastAPI's own telemetry, gRPC servers and channels get
opentelemetry-instrumentation-grpc's interceptors, a worker's httpx calls
opentelemetry-instrumentation-httpx's); the parts add the domain's spans (admission, dispatch,
queue, prefill, decode) with :attr:`Part.tracer`. While a part is off its tracer is OpenTelemetry's
no-op one, it installs no interceptor and the SDK is never imported: the per-token path is the
same as without tracing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace

from common.errors import ApiError

if TYPE_CHECKING:  # FastAPI is the bridge's: the other parts never import it
    from fastapi.telemetry import TelemetryConfig

log = logging.getLogger("tokenwire")

# Where the request id goes on a part's request span (OpenTelemetry has no name for it).
REQUEST_ID = "tokenwire.request_id"
# The gRPC services whose calls are traced: the request path, not health, reflection or the registry.
TRACED_SERVICES = ("tokenwire.v1.InferenceService", "tokenwire.v1.WorkerService")
# The bridge's paths that probes and scrapers call: never traced.
UNTRACED_PATHS = frozenset({"/health", "/ready", "/metrics"})


class Part:
    """One part's tracing (the bridge, the gateway, a worker): off until :func:`configure`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.on = False
        # --trace-content: prompt and completion text on the spans.
        self.content = False
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.provider: Any = None  # the SDK's TracerProvider, while on

    def start_span(self, name: str, attributes: Mapping[str, Any] | None = None) -> trace.Span:
        """A span, child of the current one; while off, OpenTelemetry's invalid span (its methods do nothing)."""
        return self.tracer.start_span(name, attributes=attributes) if self.on else trace.INVALID_SPAN

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """A server span for each call of the request path's services (none while off)."""
        if not self.on:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return [aio_server_interceptor(self.provider, filters.any_of(*map(filters.service_name, TRACED_SERVICES)))]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """A client span for each call on a channel, ``traceparent`` in its metadata (none while off)."""
        if not self.on:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return list(aio_client_interceptors(self.provider))

    def fastapi_telemetry(self) -> TelemetryConfig:
        """FastAPI's own telemetry (``FastAPI(telemetry=...)``): an HTTP server span a request,
        none for probes and scrapes; no metrics or logs of its own (the bridge has /metrics)."""
        if not self.on:
            return {"tracing": False, "metrics": False, "logs": False}
        return {
            "tracer_provider": self.provider,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "exclude": lambda scope: scope.get("path") in UNTRACED_PATHS,
        }


_parts: dict[str, Part] = {}


def part(name: str) -> Part:
    """The named part's tracing, the same object wherever it is asked for (like a logger)."""
    found = _parts.get(name)
    if found is None:
        found = _parts[name] = Part(name)
    return found


def endpoint(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """Where traces go, or None for no tracing: the flag, else the standard variables.

    A setting tokenwire cannot honour is a startup error naming it, not traces silently lost."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter == "none":
        return None
    if exporter != "otlp":
        raise SystemExit(f"OTEL_TRACES_EXPORTER={exporter}: tokenwire exports traces over OTLP only (otlp or none)")
    where = flag or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not where:
        return None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip().lower()
        if protocol and protocol != "grpc":
            raise SystemExit(f"{name}={protocol}: tokenwire exports OTLP over gRPC (grpc, port 4317)")
        if protocol:
            break
    return where


def configure(name: str, endpoint_flag: str | None, content: bool, environ: Mapping[str, str] = os.environ) -> Part:
    """Turn the named part's tracing on if it is asked for (see the module's docstring)."""
    traced = part(name)
    where = endpoint(endpoint_flag, environ)
    if where is None:
        return traced
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise SystemExit(f"tracing needs the tracing extra (pip install 'tokenwire[tracing]'): {error}") from None
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create; ours only fills the gap.
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"tokenwire-{name}"}
    # The sampler is the SDK's from OTEL_TRACES_SAMPLER (default: parentbased_always_on).
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=where)))
    traced.provider = provider
    traced.tracer = provider.get_tracer(f"tokenwire.{name}")
    traced.content = content
    traced.on = True
    log.info(
        "%s: traces go to %s over OTLP/gRPC%s", name, where, ", with prompt and completion text" if content else ""
    )
    return traced


def instrument_httpx(traced: Part) -> None:
    """A client span and ``traceparent`` on every httpx request of this process (the openai
    engine's calls to its upstream), while ``traced`` is on."""
    if traced.on:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor().instrument(tracer_provider=traced.provider)


def set_on_current_span(traced: Part, attributes: Mapping[str, Any]) -> None:
    """Attributes on the span of the call being served (a part's request span), while it records."""
    if traced.on:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(attributes)


def failed(span: trace.Span, error: BaseException, kind: str | None = None) -> None:
    """A span's error: its status, ``error.type`` (an OpenAI code, a gRPC code's name, or the
    exception's class) and the exception."""
    if span.is_recording():
        if kind is None:
            kind = (error.code or error.type) if isinstance(error, ApiError) else type(error).__name__
        span.set_attribute("error.type", kind)
        span.set_status(trace.StatusCode.ERROR, f"{kind}: {error}")
        span.record_exception(error)


class Block:
    """A span around a block of code that calls nothing traced (it is not made the current span):
    it ends with the block, and what the block raises is its error. Under 1 us while off (OpenTelemetry's
    own ``start_as_current_span`` costs 6 us even then)."""

    __slots__ = ("span",)

    def __init__(self, traced: Part, name: str) -> None:
        self.span = traced.start_span(name)

    def __enter__(self) -> trace.Span:
        return self.span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is not None:
            failed(self.span, error)
        self.span.end()
