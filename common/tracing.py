"""Traces: OpenTelemetry spans of one request across the bridge, the gateway, a worker and an
upstream engine, exported over OTLP/gRPC. Off by default ([Operations](../docs/operations.md#traces)).

A part traces when it is given ``--otlp-traces-endpoint``, or when the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set;
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off. The rest is the SDK's own
standard settings: ``OTEL_SERVICE_NAME`` (default ``tokenwire-<part>``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``; the W3C trace context
(``traceparent``) in and out.

Each part has its own tracer provider, so that it reports as its own service also where two
share a process (serve's front end). The bridge's HTTP server span is FastAPI's own telemetry, and
a worker's calls to its upstream are traced by opentelemetry-instrumentation-httpx. A gRPC call's
server span is :class:`ServedCall`, in the one wrapper every call already has
(``common.grpc_server.CallInterceptor``). A call's client span is the gateway's ``dispatch`` (a
worker call, which sends its context with :func:`call_metadata`), and the bridge's channel's
:class:`CallSpans` (a call to the gateway), an interceptor only while the bridge traces.
opentelemetry-instrumentation-grpc's aio interceptors were not used: on every server and channel,
traced or not, they wrap every streamed message (measured: 31 us of the front end's CPU a token,
and 0.7 ms a request, with no request sampled; bench/RESULTS.md). The parts add the domain's spans
(admission, dispatch, queue, prefill, decode). While a part is off its tracer is OpenTelemetry's no-op one, its spans the invalid span,
and the SDK is never imported: the per-token path is the same as without tracing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Mapping
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from common import addresses
from common.errors import ApiError

if TYPE_CHECKING:  # FastAPI is the bridge's: the other parts never import it
    from fastapi.telemetry import TelemetryConfig

log = logging.getLogger("tokenwire")

# Where the request id goes on a part's request span (OpenTelemetry has no name for it).
REQUEST_ID = "tokenwire.request_id"
# The gRPC services whose calls are traced: the request path, not health, reflection or the registry.
TRACED_METHODS = ("/tokenwire.v1.InferenceService/", "/tokenwire.v1.WorkerService/")
# gRPC statuses that are the server's failure (OpenTelemetry's RPC conventions): its span's error.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
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

    def start_span(
        self, name: str, attributes: Mapping[str, Any] | None = None, kind: trace.SpanKind = trace.SpanKind.INTERNAL
    ) -> trace.Span:
        """A span, child of the current one; while off, OpenTelemetry's invalid span (its methods do nothing)."""
        return self.tracer.start_span(name, kind=kind, attributes=attributes) if self.on else trace.INVALID_SPAN

    def channel_interceptors(self, target: str) -> list[grpc.aio.ClientInterceptor]:
        """A channel's interceptors: while on, :class:`CallSpans` (a client span a call); while off, none."""
        return [UnaryCallSpans(self, target), StreamCallSpans(self, target)] if self.on else []

    def fastapi_telemetry(self) -> TelemetryConfig:
        """FastAPI's own telemetry (``FastAPI(telemetry=...)``): an HTTP server span a request,
        none for probes and scrapes; no metrics or logs of its own (the bridge has /metrics)."""
        if not self.on:
            # Off said outright: else FastAPI looks for a global provider on every request (23 us).
            return {"tracing": False, "metrics": False, "logs": False}
        return {
            "tracer_provider": self.provider,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "exclude": lambda scope: scope.get("path") in UNTRACED_PATHS,
        }


_parts: dict[str, Part] = {}
_anywhere = False  # some part of this process traces: its calls carry the trace context


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
    global _anywhere
    _anywhere = True
    log.info(
        "%s: traces go to %s over OTLP/gRPC%s", name, where, ", with prompt and completion text" if content else ""
    )
    return traced


def call_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's context as gRPC metadata (``traceparent``, ``tracestate``), for a call
    made on its behalf: the callee's server span continues the trace. None while nothing traces."""
    if not _anywhere:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


class ServedCall:
    """The server span of one gRPC call (``common.grpc_server.CallInterceptor``'s), current while it
    runs: the caller's trace continued from its metadata, or a new one. Per call, never per message."""

    __slots__ = ("span", "token")

    def __init__(self, traced: Part, method: str, metadata: Mapping[str, str], request_id: str) -> None:
        name = method.lstrip("/")
        service, _, rpc = name.partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc, REQUEST_ID: request_id}
        parent = propagate.extract(metadata)
        self.span = traced.tracer.start_span(name, parent, trace.SpanKind.SERVER, attributes)
        self.token: Token[otel_context.Context] | None = None

    def __enter__(self) -> trace.Span:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        code = _status(error)
        if self.span.is_recording():
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if error is not None and code in SERVER_ERRORS:
                failed(self.span, error)
            elif error is not None:  # the caller's doing (a 4xx, or it left): no error of this span's
                self.span.set_attribute("error.type", error_type(error))
        if self.token is not None:
            otel_context.detach(self.token)
        self.span.end()


class CallSpans:
    """The client span of each call on one channel (the bridge's to the gateway): a child of the
    current span (the HTTP request's), its context sent in the call's metadata, ended when the
    call ends, with its status (a stream's at its end, also when it is cancelled or fails). It is
    never the current span and sees no message: a stream's messages pay only grpc.aio's own
    interceptor step. Two interceptors, :class:`UnaryCallSpans` and :class:`StreamCallSpans`
    (grpc.aio files an interceptor under one kind only), on a channel only while the part traces
    (:meth:`Part.channel_interceptors`): without tracing, the channel has no interceptor at all."""

    def __init__(self, traced: Part, target: str) -> None:
        self.traced = traced
        try:
            host, port = addresses.split(target)
            self.server: dict[str, Any] = {"server.address": host, "server.port": port}
        except ValueError:  # a target that is not host:port (unix:, dns:///): said as it is
            self.server = {"server.address": target}
        self.ending: set[asyncio.Task[None]] = set()

    async def call(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if not method.startswith(TRACED_METHODS):
            return await continuation(details, request)
        name = method.lstrip("/")
        service, _, rpc = name.partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc, **self.server}
        span = self.traced.tracer.start_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in carrier.items():
            metadata[key] = value
        try:
            call = await continuation(details._replace(metadata=metadata), request)
        except BaseException as error:
            failed(span, error)
            span.end()
            raise
        call.add_done_callback(functools.partial(self._done, span))
        return call

    def _done(self, span: trace.Span, call: Any) -> None:
        # The call's status is read with an await (grpc.aio has no other way); it is there already.
        ended = time.time_ns()
        task = asyncio.get_running_loop().create_task(self._end(span, call, ended))
        self.ending.add(task)
        task.add_done_callback(self.ending.discard)

    @staticmethod
    async def _end(span: trace.Span, call: Any, ended: int) -> None:
        code = await call.code()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:  # a client's span: every status but OK is its error (OpenTelemetry's gRPC rule)
            span.set_attribute("error.type", code.name)
            span.set_status(trace.StatusCode.ERROR, f"{code.name}: {await call.details()}")
        span.end(ended)


class UnaryCallSpans(CallSpans, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self.call(continuation, details, request)


class StreamCallSpans(CallSpans, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self.call(continuation, details, request)


def _status(error: BaseException | None) -> grpc.StatusCode:
    """The status a call that ended with ``error`` answers (common.grpc_server's mapping)."""
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, ApiError):
        return error.status
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


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


def error_type(error: BaseException) -> str:
    """``error.type`` of a span that ended with ``error``: the OpenAI code the caller got, ``cancelled``
    for a caller that left, else the exception's class."""
    if isinstance(error, ApiError):
        return error.code or error.type
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return type(error).__name__


def failed(span: trace.Span, error: BaseException, kind: str | None = None) -> None:
    """A span's error: its status, ``error.type`` (by default :func:`error_type`; a gRPC code's
    name for a worker call) and the exception."""
    if span.is_recording():
        kind = kind or error_type(error)
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
