"""What every tokenwire gRPC server has: error mapping, health, reflection,
graceful shutdown. Used by the gateway, the standalone registry and workers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import cluster, tracing
from common.errors import ApiError, internal, unavailable
from common.observability import REQUEST_ID_HEADER, clean_request_id, request_id
from common.settings import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger("tokenwire")

# Message size limits, per process (--max-receive-message-length and
# --max-send-message-length on the gateway and the workers; the bridge's channel
# follows its --max-body-bytes). Past them gRPC answers RESOURCE_EXHAUSTED, which
# common/errors.py maps to 413. gRPC's own default receive limit is 4 MB.
_message_limits = {
    "grpc.max_receive_message_length": DEFAULT_MAX_BODY_BYTES,
    "grpc.max_send_message_length": DEFAULT_MAX_BODY_BYTES,
}

# HTTP/2 keepalive, set on both ends so that they agree (the values are in
# docs/limits-and-robustness.md), all from two figures every part takes as flags
# (--grpc-keepalive-interval, --grpc-keepalive-timeout) or from the environment
# (TOKENWIRE_GRPC_KEEPALIVE_INTERVAL, TOKENWIRE_GRPC_KEEPALIVE_TIMEOUT):
# - channels (gateway -> workers, workers -> registry, bridge -> gateway) ping
#   after an interval without traffic, also with no call open (a dead worker is
#   noticed before a request is sent to it) and however long a stream is silent
#   (queued, evaluating a long prompt): max_pings_without_data 0 = no cap;
# - a ping unanswered for the timeout closes the connection, and so does any
#   other ping (grpc's flow-control pings, sent as data arrives, are unanswered
#   first when a peer stops: their own timeout is a minute unless set), and data
#   unacknowledged that long (grpc sets TCP_USER_TIMEOUT to it): a peer gone
#   silent (blackholed, SIGSTOPped) is given up within interval + timeout,
#   12 s by default, and its calls fail UNAVAILABLE;
# - a peer that was given up (or refused a connection) is dialled again at most
#   an interval later (grpc's own back-off grows to 120 s);
# - servers accept such pings (permit_without_calls, and a minimum interval
#   of half the channels', so a client is never told "too many pings"), and
#   ping their own clients after 1.5 intervals of silence, so a client that
#   vanished without closing its connection has its calls cancelled and the
#   slots they held freed within 1.5 intervals + the timeout (16 s).
KEEPALIVE_INTERVAL_ENV = "TOKENWIRE_GRPC_KEEPALIVE_INTERVAL"
KEEPALIVE_TIMEOUT_ENV = "TOKENWIRE_GRPC_KEEPALIVE_TIMEOUT"
DEFAULT_KEEPALIVE_INTERVAL = 8.0
DEFAULT_KEEPALIVE_TIMEOUT = 4.0


def _seconds(text: str | None, default: float, names: str) -> float:
    """A positive number of seconds; a ValueError naming the setting otherwise."""
    text = (text or "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{names} must be a positive number of seconds, not {text!r}")
    return value


@dataclass(frozen=True)
class Keepalive:
    """A process's gRPC keepalive: every figure follows from ``interval`` and ``timeout`` (seconds)."""

    interval: float = DEFAULT_KEEPALIVE_INTERVAL
    timeout: float = DEFAULT_KEEPALIVE_TIMEOUT

    @classmethod
    def parse(cls, interval: str | None, timeout: str | None) -> Keepalive:
        """From the flags' text (empty: the default); a ValueError naming the flag and its variable."""
        return cls(
            _seconds(interval, DEFAULT_KEEPALIVE_INTERVAL, f"--grpc-keepalive-interval ({KEEPALIVE_INTERVAL_ENV})"),
            _seconds(timeout, DEFAULT_KEEPALIVE_TIMEOUT, f"--grpc-keepalive-timeout ({KEEPALIVE_TIMEOUT_ENV})"),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Keepalive:
        """From TOKENWIRE_GRPC_KEEPALIVE_INTERVAL and _TIMEOUT (for a command without the flags)."""
        return cls.parse(environ.get(KEEPALIVE_INTERVAL_ENV), environ.get(KEEPALIVE_TIMEOUT_ENV))

    @property
    def time_ms(self) -> int:
        """Channels ping after this much silence (2 ms or more: half of it is a server's minimum)."""
        return max(2, round(self.interval * 1000))

    @property
    def timeout_ms(self) -> int:
        return max(1, round(self.timeout * 1000))

    @property
    def min_ping_interval_ms(self) -> int:
        """Servers accept pings this far apart, or further."""
        return self.time_ms // 2

    @property
    def server_time_ms(self) -> int:
        """Servers ping a silent client after this long."""
        return self.time_ms * 3 // 2

    @property
    def detection(self) -> float:
        """The longest a channel takes to give up a peer gone silent, in seconds."""
        return self.interval + self.timeout

    def _common(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            # Every ping's answer, not only keepalive's (a flow-control ping in flight holds keepalive's back).
            ("grpc.http2.ping_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", self.time_ms),
            *self._common(),
            ("grpc.initial_reconnect_backoff_ms", min(1000, self.time_ms)),
            ("grpc.max_reconnect_backoff_ms", self.time_ms),
            # Long-lived: never idle (grpc drops an idle channel's connection after 30 min without calls).
            ("grpc.client_idle_timeout_ms", 2**31 - 1),
        ]

    def server_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", self.server_time_ms),
            *self._common(),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_ms),
        ]


_keepalive = Keepalive()


def configure_keepalive(keepalive: Keepalive) -> None:
    """This process's gRPC keepalive (its channels and its servers alike)."""
    global _keepalive
    _keepalive = keepalive


def keepalive() -> Keepalive:
    """This process's gRPC keepalive."""
    return _keepalive


def configure_message_limits(receive: int | None = None, send: int | None = None) -> None:
    """This process's gRPC message limits in bytes (None: the default, 10 MiB)."""
    _message_limits["grpc.max_receive_message_length"] = receive or DEFAULT_MAX_BODY_BYTES
    _message_limits["grpc.max_send_message_length"] = send or DEFAULT_MAX_BODY_BYTES


def channel_options() -> list[tuple[str, Any]]:
    return [*_message_limits.items(), *_keepalive.channel_options()]


def server_options() -> list[tuple[str, Any]]:
    return [*_message_limits.items(), *_keepalive.server_options(), ("grpc.so_reuseport", 0)]


# -- channels and TLS -------------------------------------------------------------
#
# TLS is a per-process setting: a process that trusts a CA (--tls-ca) dials
# every tokenwire peer (gateway -> workers, worker -> registry, bridge ->
# gateway) over TLS; a process with --tls-cert/--tls-key serves TLS, and
# presents that certificate as its client certificate when it dials (mTLS).

_client_credentials: grpc.ChannelCredentials | None = None


def _read_pem(flag: str, path: str) -> bytes:
    """A PEM file a flag names; a startup error naming the flag if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise SystemExit(f"{flag} {path}: {error.strerror}") from None


def configure_client_tls(ca_path: str | None, cert_path: str | None = None, key_path: str | None = None) -> None:
    global _client_credentials
    if ca_path:
        root = _read_pem("--tls-ca", ca_path)
        chain = key = None
        if cert_path and key_path:
            chain, key = _read_pem("--tls-cert", cert_path), _read_pem("--tls-key", key_path)
        _client_credentials = grpc.ssl_channel_credentials(root, private_key=key, certificate_chain=chain)
    else:
        _client_credentials = None


def server_credentials(
    cert_path: str | None, key_path: str | None, client_ca_path: str | None = None
) -> grpc.ServerCredentials | None:
    """TLS for a server; with ``client_ca_path``, only clients with a certificate from that CA get in."""
    if not cert_path and not key_path:
        if client_ca_path:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS with client certificates")
        return None
    if not (cert_path and key_path):
        raise SystemExit("--tls-cert and --tls-key go together")
    pair = (_read_pem("--tls-key", key_path), _read_pem("--tls-cert", cert_path))
    if not client_ca_path:
        return grpc.ssl_server_credentials([pair])
    root = _read_pem("--tls-client-ca", client_ca_path)
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=True)


def open_channel(address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> grpc.aio.Channel:
    """An aio channel to a tokenwire peer, with TLS when the process trusts a CA."""
    if _client_credentials is not None:
        return grpc.aio.secure_channel(
            address, _client_credentials, options=channel_options(), interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=channel_options(), interceptors=interceptors)


def open_sync_channel(address: str) -> grpc.Channel:
    if _client_credentials is not None:
        return grpc.secure_channel(address, _client_credentials, options=channel_options())
    return grpc.insecure_channel(address, options=channel_options())


async def abort_with(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    await context.abort(error.status, error.message, error.trailing_metadata())


def really_cancelled(context: grpc.aio.ServicerContext | None = None) -> bool:
    """Whether a CancelledError here is a real cancellation: the caller gone
    (``context``), a deadline, a shutdown. The one place this is decided.

    A grpc.aio call also raises CancelledError when its channel is closed
    under it (a worker left the pool): that is a failure of that call, to
    fail over or answer, not a cancellation of ours.
    """
    task = asyncio.current_task()
    return (context is not None and context.cancelled()) or task is None or task.cancelling() > 0


async def _unless_really_cancelled(context: grpc.aio.ServicerContext, method: str) -> None:
    """Re-raise a real cancellation; answer a stray one (an inner call's
    channel closed) with a status, so the caller is never left waiting."""
    if really_cancelled(context):
        raise asyncio.CancelledError
    log.warning("a call inside %s was cut short; answering UNAVAILABLE", method)
    await abort_with(context, unavailable("A model worker went away during the request. Retry it."))


@contextlib.asynccontextmanager
async def _answered(context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
    """Every way a handler can fail, as the status its caller gets (unary and stream alike)."""
    try:
        yield
    except ApiError as error:
        await abort_with(context, error)
    except asyncio.CancelledError:
        await _unless_really_cancelled(context, method)
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("unexpected error in %s", method)
        await abort_with(context, internal())


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Every call's request id (the caller's ``x-request-id``, or a new one) for logs and
    onward calls, its span while ``traced`` is on (the request path's calls: common/tracing.py),
    and every way it can fail as the status its caller gets: handlers raise, only this aborts.
    One wrapper a call (a stream's messages pass one generator), for unary and server-streaming
    methods alike.
    """

    def __init__(self, traced: tracing.Part | None = None) -> None:
        self.traced = traced

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        rid: str | None = None  # health and reflection calls keep none
        spanned: Callable[[], contextlib.AbstractContextManager[object]] = _no_span
        if not method.startswith("/grpc."):
            metadata = dict(handler_call_details.invocation_metadata or ())
            rid = clean_request_id(metadata.get(REQUEST_ID_HEADER))
            traced = self.traced
            if traced is not None and traced.on and method.startswith(tracing.TRACED_METHODS):
                spanned = functools.partial(tracing.ServedCall, traced, method, metadata, rid)
        if handler.unary_unary is not None:
            unary_behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if rid is not None:
                    request_id.set(rid)
                async with _answered(context, method):
                    with spanned():
                        return await unary_behavior(request, context)

            return handler._replace(unary_unary=unary)
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if rid is not None:
                    request_id.set(rid)
                async with _answered(context, method):
                    with spanned():
                        responses = stream_behavior(request, context)
                        if inspect.isawaitable(responses):
                            # A handler that sends with context.write() (grpc.health.v1 Watch): it returns nothing.
                            await responses
                            return
                        async for response in responses:
                            yield response

            return handler._replace(unary_stream=stream)
        return handler


def _no_span() -> contextlib.AbstractContextManager[object]:
    return _NO_SPAN


_NO_SPAN = contextlib.nullcontext()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a call to a worker made on behalf of the current request (and its span)."""
    return ((REQUEST_ID_HEADER, request_id.get()), *cluster.call_metadata(), *tracing.call_metadata())


class GrpcServer:
    """A grpc.aio server with health and reflection, started and stopped as one."""

    def __init__(
        self,
        services: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
        *,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        traced: tracing.Part | None = None,
    ) -> None:
        self.server = grpc.aio.server(
            # The call wrapper before the part's own (the gateway's keys): a call they refuse is
            # answered, logged under its request id and traced like any other.
            interceptors=[cluster.ClusterAuthInterceptor(), CallInterceptor(traced), *interceptors],
            options=server_options(),
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = [name for _, _, name in services]
        for add, servicer, _ in services:
            add(servicer, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0

    def bind(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        return self.port

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        for name in ["", *self.service_names]:
            await self.set_status(name, serving)

    async def set_status(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        """Health turns NOT_SERVING, new calls are refused, running ones get ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
