"""The gateway's and the registry's flags, declared once, and how they start."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import addresses, sampling, settings

if TYPE_CHECKING:  # imported when a gateway starts: a process's metrics are its own part's only
    from gateway.auth import KeyLimits, KeySpec
    from gateway.routing import Router


def api_flags(parser: argparse.ArgumentParser) -> None:
    """The public API's keys, limits and registry settings (the gateway's, and serve's)."""
    parser.add_argument("--api-keys", default=None, help="comma-separated API keys; none = open API")
    parser.add_argument(
        "--api-keys-file",
        default=None,
        help="one key per line, optionally 'rpm=N tpm=N' after it (keeps keys out of ps)",
    )
    parser.add_argument("--rate-limit-rpm", type=int, default=None, help="requests per minute per key (default: none)")
    parser.add_argument("--rate-limit-tpm", type=int, default=None, help="tokens per minute per key (default: none)")
    parser.add_argument(
        "--limits-when-store-down",
        choices=("local", "closed"),
        default="local",
        help="while the shared store (--store redis://...) is down: local = each replica counts the limits "
        "alone (a key gets them once per replica), closed = limited keys get 503 store_unavailable",
    )
    parser.add_argument(
        "--heartbeat-expiry", type=float, default=15.0, help="drop a worker after this many seconds without heartbeat"
    )
    sampling.limit_flags(parser)  # --max-n, --max-tokens-limit (the bridge takes them too, for its schema)
    routing_flags(parser)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="where files and batches live, a SQLite database and a files directory "
        "(default: $XDG_DATA_HOME/tokenwire, else ~/.local/share/tokenwire); with --store redis://... "
        "they live in the store instead",
    )
    parser.add_argument(
        "--batch-max-file-bytes",
        type=settings.positive_int,
        default=settings.DEFAULT_MAX_BODY_BYTES,
        help="largest file POST /v1/files takes (default: the bridge's --max-body-bytes default, "
        f"{settings.DEFAULT_MAX_BODY_BYTES}; a larger file needs a larger --max-body-bytes too)",
    )
    parser.add_argument(
        "--batch-max-lines",
        type=settings.positive_int,
        default=50_000,
        help="most requests in one batch's input file (default 50000, as OpenAI)",
    )
    parser.add_argument(
        "--batch-window-seconds",
        type=settings.positive_int,
        default=24 * 3600,
        help="how long a batch's completion window ('24h', the one OpenAI offers) lasts, in seconds; its "
        "unfinished requests then end with batch_expired (default 86400; tests shorten it)",
    )
    parser.add_argument(
        "--expect-models",
        default="",
        help="comma-separated models that must have a live worker for readiness (default: every model seen)",
    )


def routing_flags(parser: argparse.ArgumentParser) -> None:
    """How the gateway picks a worker among a model's (docs/configuration.md#routing)."""
    parser.add_argument(
        "--routing",
        choices=("cache-aware", "least-loaded"),
        default="cache-aware",
        help="cache-aware: a conversation's next turn goes to the worker holding its prefix; least-loaded: load only",
    )
    parser.add_argument(
        "--routing-margin-calls",
        type=int,
        default=4,
        help="a worker holding the prefix loses it when it runs more than this many calls more than the least loaded",
    )
    parser.add_argument(
        "--routing-margin-ratio",
        type=float,
        default=1.5,
        help="... and more than this many times as many (both must hold)",
    )
    parser.add_argument(
        "--routing-margin-queue",
        type=int,
        default=4,
        help="calls a worker holding the prefix may queue beyond its slots while another worker has a free one",
    )
    parser.add_argument(
        "--routing-placement",
        choices=("spread", "hash"),
        default="spread",
        help="a new conversation goes to the least-loaded worker holding the fewest prefixes (spread), or by "
        "the hash of its first prefix (hash: replicas that share no --store still agree)",
    )
    parser.add_argument(
        "--routing-index-mib", type=float, default=64.0, help="memory cap of the prefix index (LRU beyond it)"
    )
    parser.add_argument(
        "--routing-index-ttl",
        type=settings.positive_seconds,
        default=600.0,
        help="with --store redis://...: seconds the shared prefix index keeps a prefix nobody sent again",
    )


def gateway_flags(parser: argparse.ArgumentParser) -> None:
    """``tokenwire gateway`` / ``python -m gateway``."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=settings.DEFAULT_GRPC_PORT)
    parser.add_argument(
        "--controller-address", default=None, help="a standalone registry (default: host one in-process)"
    )
    parser.add_argument("--shutdown-grace", type=float, default=10.0)
    api_flags(parser)
    parser.add_argument(
        "--registry-port",
        type=int,
        default=None,
        help="serve the registry on this internal port instead of the public one (0 = any free port)",
    )
    parser.add_argument("--registry-host", default=None, help="address of --registry-port (default: --host)")
    settings.store_flags(parser)
    settings.member_flags(parser)


def registry_flags(parser: argparse.ArgumentParser) -> None:
    """``tokenwire registry``: a standalone registry (FastChat's controller)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument("--heartbeat-expiry", type=float, default=15.0)
    settings.keepalive_flags(parser)
    settings.tls_server_flags(parser)
    settings.cluster_flags(parser, serving=True)
    settings.logging_flags(parser)


def api_keys(args: argparse.Namespace) -> list[KeySpec]:
    """Keys from --api-keys (comma-separated) and --api-keys-file (one per
    line: ``<key> [rpm=N] [tpm=N]``), with the --rate-limit-* defaults."""
    from gateway.auth import KeyLimits, KeySpec, parse_key_line

    default = KeyLimits(args.rate_limit_rpm, args.rate_limit_tpm)
    specs = [KeySpec(key, default) for key in settings.split(args.api_keys)]
    if args.api_keys_file:
        with open(args.api_keys_file, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        specs += [parse_key_line(line, default) for line in lines if line and not line.startswith("#")]
    return specs


def data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tokenwire"


def router(args: argparse.Namespace) -> Router | None:
    """The cache-aware router the flags ask for (None: least-loaded)."""
    from gateway.routing import Margin, MemoryIndex, Router

    if args.routing == "least-loaded":
        return None
    index = MemoryIndex(int(args.routing_index_mib * 2**20))
    margin = Margin(args.routing_margin_calls, args.routing_margin_ratio, args.routing_margin_queue)
    return Router(index, margin, placement=args.routing_placement)


def key_limits(args: argparse.Namespace) -> KeyLimits:
    from gateway.auth import KeyLimits

    return KeyLimits(args.rate_limit_rpm, args.rate_limit_tpm)


def check(args: argparse.Namespace) -> None:
    """What must hold before the gateway starts (a clear error, not a half-open cluster)."""
    from common import cluster

    registry_host = args.registry_host or args.host
    cluster.check_listen("gateway", [args.host, registry_host], insecure=args.insecure_cluster)
    if args.tls_client_ca and args.registry_port is None and not args.controller_address:
        raise SystemExit(
            "--tls-client-ca on a gateway needs --registry-port: client certificates are required on the "
            "registry's own port, so that API clients still reach the public port without one"
        )


def serving(
    args: argparse.Namespace, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None
) -> Coroutine[Any, Any, None]:
    """The gateway until ``stop``; ``on_ready(port)`` once it serves (after its READY line)."""
    from common import store, tracing
    from common.grpc_server import server_credentials
    from gateway.app import run_gateway
    from gateway.batches.runner import BatchLimits
    from gateway.key_reload import KeysSource

    tracing.configure("gateway", args.otlp_traces_endpoint, args.trace_content)
    registry_host = args.registry_host or args.host

    def registry_ready(host: str, port: int) -> None:
        print(f"REGISTRY {addresses.join(host, port)}", flush=True)

    def ready(port: int) -> None:
        settings.ready("gateway", args.host, port)
        if on_ready is not None:
            on_ready(port)

    return run_gateway(
        host=args.host,
        port=args.port,
        controller_address=args.controller_address,
        keys=KeysSource(lambda: api_keys(args), args.api_keys_file),
        default_limits=key_limits(args),
        store=store.config(args),
        limits_when_store_down=args.limits_when_store_down,
        heartbeat_expiry=args.heartbeat_expiry,
        limits=sampling.limits(args),
        router=router(args),
        routing_index_ttl=args.routing_index_ttl,
        shutdown_grace=args.shutdown_grace,
        expect_models=settings.split(args.expect_models),
        metrics_port=args.metrics_port,
        data_dir=data_dir(args),
        batch_limits=BatchLimits(args.batch_max_file_bytes, args.batch_max_lines, args.batch_window_seconds),
        tls=server_credentials(args.tls_cert, args.tls_key),
        registry_port=args.registry_port,
        registry_host=registry_host,
        registry_tls=server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca),
        stop=stop,
        on_ready=ready,
        on_registry_ready=registry_ready,
    )


def run(args: argparse.Namespace) -> None:
    check(args)
    settings.run_server(lambda stop: serving(args, stop))


def run_registry(args: argparse.Namespace) -> None:
    from common import cluster
    from common.grpc_server import server_credentials
    from gateway.app import run_registry

    cluster.check_listen("registry", [args.host], insecure=args.insecure_cluster)
    settings.run_server(
        lambda stop: run_registry(
            host=args.host,
            port=args.port,
            heartbeat_expiry=args.heartbeat_expiry,
            tls=server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca),
            stop=stop,
            on_ready=lambda port: settings.ready("registry", args.host, port),
        )
    )
