"""The REST bridge's flags, declared once, and how it starts."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from typing import TYPE_CHECKING

from common import sampling, settings

if TYPE_CHECKING:
    import uvicorn


def bridge_flags(parser: argparse.ArgumentParser) -> None:
    """``tokenwire bridge`` / ``python -m rest_bridge``."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=settings.DEFAULT_HTTP_PORT)
    parser.add_argument(
        "--gateway-address",
        "--controller-address",
        default=f"127.0.0.1:{settings.DEFAULT_GRPC_PORT}",
        help="the gateway's gRPC address (--controller-address is FastChat's name for it)",
    )
    parser.add_argument("--shutdown-grace", type=float, default=10.0)
    api_flags(parser)
    # The gateway's bounds, for /openapi.json: `tokenwire serve` passes the bridge the gateway's values.
    sampling.limit_flags(parser)
    settings.store_flags(parser)
    settings.keepalive_flags(parser)
    settings.tls_client_flag(parser)
    settings.tracing_flags(parser)
    settings.logging_flags(parser)


def api_flags(parser: argparse.ArgumentParser) -> None:
    """CORS, body, connection and Responses-store settings (the bridge's, and serve's)."""
    parser.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    parser.add_argument(
        "--allowed-origins",
        default="",
        help="CORS: the web origins whose pages may call the API, comma-separated or a JSON list ('*': any); "
        "default none (the chat page at / is same-origin)",
    )
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="Host names served besides loopback ones, comma-separated or a JSON list ('*': any); on a loopback "
        "bind other names are refused (DNS rebinding), on a public one any name is served unless this is given",
    )
    parser.add_argument("--allowed-methods", default="*", help="CORS: methods, comma-separated or a JSON list")
    parser.add_argument("--allowed-headers", default="*", help="CORS: headers, comma-separated or a JSON list")
    parser.add_argument(
        "--max-body-bytes", type=int, default=settings.DEFAULT_MAX_BODY_BYTES, help="larger request bodies get 413"
    )
    connection_flags(parser)
    parser.add_argument(
        "--responses-store-size", type=int, default=1000, help="stored Responses API responses kept (LRU; 0 = none)"
    )
    parser.add_argument(
        "--responses-store-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="bytes of stored responses and their conversations kept (LRU)",
    )
    parser.add_argument(
        "--responses-store-ttl",
        type=settings.positive_seconds,
        default=30 * 24 * 3600.0,
        help="seconds a stored response is kept after its last use (default: 30 days)",
    )


def connection_flags(parser: argparse.ArgumentParser) -> None:
    """Connection limits and stream keep-alives (rest_bridge/connections.py, rest_bridge/keepalive.py)."""
    parser.add_argument(
        "--request-read-timeout",
        type=settings.positive_seconds,
        default=5.0,
        help="seconds a new connection has to send a whole request head, and a body may pause between reads; "
        "past it the connection is closed (408 if part of a request came)",
    )
    parser.add_argument(
        "--max-connections",
        type=settings.positive_int,
        default=2048,
        help="open HTTP connections per bridge process; a connection past it gets 503 with Retry-After",
    )
    parser.add_argument(
        "--sse-keepalive-interval",
        type=float,
        default=15.0,
        help="a stream silent this many seconds sends the SSE comment ': keep-alive' (0 = never)",
    )


def server(args: argparse.Namespace) -> tuple[uvicorn.Server, socket.socket]:
    """The bridge's uvicorn server, and its socket, bound to --host/--port."""
    import uvicorn

    from common import store, tracing
    from rest_bridge import connections, origins
    from rest_bridge.app import create_app
    from rest_bridge.config import BridgeSettings

    tracing.configure("bridge", args.otlp_traces_endpoint, args.trace_content)
    bridge_settings = BridgeSettings(
        gateway_address=args.gateway_address,
        limits=sampling.limits(args),
        allow_credentials=args.allow_credentials,
        allowed_origins=settings.list_flag(args.allowed_origins, "--allowed-origins"),
        allowed_methods=settings.list_flag(args.allowed_methods, "--allowed-methods"),
        allowed_headers=settings.list_flag(args.allowed_headers, "--allowed-headers"),
        allowed_hosts=origins.allowed_hosts(args.host, settings.list_flag(args.allowed_hosts, "--allowed-hosts")),
        max_body_bytes=args.max_body_bytes,
        responses_store_size=args.responses_store_size,
        responses_store_bytes=args.responses_store_bytes,
        responses_store_ttl=args.responses_store_ttl,
        store=store.config(args),
        sse_keepalive_interval=args.sse_keepalive_interval,
    )
    # IPPROTO_TCP explicitly: only then does the event loop set TCP_NODELAY on
    # accepted connections (without it, Nagle + delayed ACK cost ~40 ms per
    # kept-alive request).
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    connections.raise_descriptor_limit(args.max_connections)
    config = uvicorn.Config(
        create_app(bridge_settings),
        # httptools, with the read deadline and the connection cap (rest_bridge/connections.py).
        http=connections.protocol_class(args.request_read_timeout, args.max_connections),
        log_level=args.log_level.lower(),
        log_config=None,  # our handlers (setup_logging), not uvicorn's
        access_log=False,
        timeout_graceful_shutdown=int(args.shutdown_grace),
    )
    return uvicorn.Server(config), sock


async def serving(args: argparse.Namespace, server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve until SIGTERM/SIGINT, which uvicorn takes while it serves: it drains the open
    requests, then raises the signal again for the handler it found."""
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn exposes no event
        await asyncio.sleep(0.02)
    if server.started:
        settings.ready("bridge", args.host, sock.getsockname()[1])
    await task


def run(args: argparse.Namespace) -> None:
    bridge, sock = server(args)
    # uvicorn's signal raised again after its graceful shutdown: let it end the
    # process quietly, with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        settings.run_loop(serving(args, bridge, sock))
    except KeyboardInterrupt:
        pass
