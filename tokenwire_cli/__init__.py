"""The ``tokenwire`` command.

    tokenwire serve      everything on loopback: gateway, bridge, one worker per default model
    tokenwire gateway    the gRPC gateway (hosts the registry unless --controller-address is given)
    tokenwire registry   a standalone registry (FastChat's controller)
    tokenwire worker     one model worker (--engine llama_cpp | embeddings | openai | echo)
    tokenwire bridge     the OpenAI REST + SSE bridge in front of a gateway
    tokenwire status     the live workers, their models, load and health

Every flag can also come from the environment: ``--api-keys`` is
``TOKENWIRE_API_KEYS``, ``--controller-address`` is
``TOKENWIRE_CONTROLLER_ADDRESS``, and so on (flags win over the environment).
Each server prints ``READY <part> <host>:<port>`` on stdout once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # each part is imported only by the command that runs it: its metrics are its own
    from gateway.auth import KeyLimits, KeySpec


ENV_PREFIX = "TOKENWIRE_"
DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8000

# engine name -> module providing add_arguments(group) and build(args).
ENGINES = {
    "llama_cpp": "workers.engines.llama_cpp",
    "embeddings": "workers.engines.embeddings",
    "openai": "workers.engines.openai_upstream",
    "echo": "workers.engines.echo",
}


def _ready(part: str, host: str, port: int) -> None:
    print(f"READY {part} {host}:{port}", flush=True)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return number


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


# FastChat takes these as JSON lists ('["*"]'); tokenwire's own form is comma-separated.
LIST_FLAGS = {
    "allowed_origins": "--allowed-origins",
    "allowed_methods": "--allowed-methods",
    "allowed_headers": "--allowed-headers",
}
# FastChat writes addresses as URLs (http://localhost:21001); gRPC wants host:port.
ADDRESS_FLAGS = ("controller_address", "gateway_address", "worker_address")


def list_flag(value: str | None, flag: str) -> list[str]:
    """A list flag in either form: FastChat's JSON list or comma-separated.

    Anything else (broken JSON, an object, stray brackets or quotes) is a
    ValueError naming the flag: read as commas it would be a silent misconfiguration.
    """
    text = (value or "").strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.strip() for item in items if item.strip()]
    elif not any(char in text for char in '[]{}"'):
        return _split(text)
    raise ValueError(f"{flag} must be a JSON list of strings ('[\"*\"]') or comma-separated (a,b), not {value!r}")


def _address(value: str | None) -> str | None:
    if value and value.startswith(("http://", "https://")):
        return value.split("://", 1)[1].rstrip("/")
    return value


def check_flag_forms(args: argparse.Namespace) -> None:
    """Normalise FastChat's flag forms in place; ValueError names a bad flag."""
    for dest, flag in LIST_FLAGS.items():
        if hasattr(args, dest):
            list_flag(getattr(args, dest), flag)
    for dest in ADDRESS_FLAGS:
        if hasattr(args, dest):
            setattr(args, dest, _address(getattr(args, dest)))


def api_keys(args: argparse.Namespace) -> list[KeySpec]:
    from gateway.auth import KeyLimits, KeySpec, parse_key_line

    """Keys from --api-keys (comma-separated) and --api-keys-file (one per
    line: ``<key> [rpm=N] [tpm=N]``), with the --rate-limit-* defaults."""
    default = KeyLimits(args.rate_limit_rpm, args.rate_limit_tpm)
    specs = [KeySpec(key, default) for key in _split(args.api_keys)]
    if args.api_keys_file:
        with open(args.api_keys_file, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        specs += [parse_key_line(line, default) for line in lines if line and not line.startswith("#")]
    return specs


def key_limits(args: argparse.Namespace) -> KeyLimits:
    from gateway.auth import KeyLimits

    return KeyLimits(args.rate_limit_rpm, args.rate_limit_tpm)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (it is a dependency: uvicorn[standard])."""
    # What is loaded at start lives as long as the process: keep the garbage
    # collector off it, and run it less often under per-request allocations.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _run(main: Callable[[asyncio.Event], Any]) -> None:
    """Run a server coroutine until SIGTERM/SIGINT."""
    from common.grpc_server import stop_event_on_signals

    async def runner() -> None:
        await main(stop_event_on_signals())

    _run_loop(runner())


# -- subcommands --------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> None:
    from common import cluster
    from common.grpc_server import server_credentials
    from gateway.app import run_gateway
    from gateway.validation import Limits

    registry_host = args.registry_host or args.host
    cluster.check_listen("gateway", [args.host, registry_host], insecure=args.insecure_cluster)
    if args.tls_client_ca and args.registry_port is None and not args.controller_address:
        raise SystemExit(
            "--tls-client-ca on a gateway needs --registry-port: client certificates are required on the "
            "registry's own port, so that API clients still reach the public port without one"
        )

    def registry_ready(host: str, port: int) -> None:
        print(f"REGISTRY {host}:{port}", flush=True)

    _run(
        lambda stop: run_gateway(
            host=args.host,
            port=args.port,
            controller_address=args.controller_address,
            api_keys=api_keys(args),
            default_limits=key_limits(args),
            heartbeat_expiry=args.heartbeat_expiry,
            limits=Limits(max_n=args.max_n, max_tokens=args.max_tokens_limit),
            shutdown_grace=args.shutdown_grace,
            expect_models=_split(args.expect_models),
            metrics_port=args.metrics_port,
            tls=server_credentials(args.tls_cert, args.tls_key),
            registry_port=args.registry_port,
            registry_host=registry_host,
            registry_tls=server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca),
            stop=stop,
            on_ready=lambda port: _ready("gateway", args.host, port),
            on_registry_ready=registry_ready,
        )
    )


def cmd_registry(args: argparse.Namespace) -> None:
    from common import cluster
    from common.grpc_server import server_credentials
    from gateway.app import run_registry

    cluster.check_listen("registry", [args.host], insecure=args.insecure_cluster)
    _run(
        lambda stop: run_registry(
            host=args.host,
            port=args.port,
            heartbeat_expiry=args.heartbeat_expiry,
            tls=server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca),
            stop=stop,
            on_ready=lambda port: _ready("registry", args.host, port),
        )
    )


def cmd_worker(args: argparse.Namespace) -> None:
    from common import cluster
    from common.grpc_server import server_credentials
    from workers.server import run_worker

    cluster.check_listen("worker", [args.host], insecure=args.insecure_cluster)
    tls = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    engine = importlib.import_module(ENGINES[args.engine]).build(args)
    _run(
        lambda stop: run_worker(
            engine,
            host=args.host,
            port=args.port,
            controller_address=args.controller_address,
            worker_address=args.worker_address,
            limit_worker_concurrency=args.limit_worker_concurrency or getattr(engine, "parallel", 5),
            max_queue=args.max_queue,
            stream_interval=args.stream_interval,
            heartbeat_interval=args.heartbeat_interval,
            shutdown_grace=args.shutdown_grace,
            metrics_port=args.metrics_port,
            tls=tls,
            stop=stop,
            on_ready=lambda port: _ready("worker", args.host, port),
        )
    )


def cmd_bridge(args: argparse.Namespace) -> None:
    import uvicorn

    from rest_bridge.app import BridgeSettings, create_app

    settings = BridgeSettings(
        gateway_address=args.gateway_address,
        allow_credentials=args.allow_credentials,
        allowed_origins=list_flag(args.allowed_origins, "--allowed-origins"),
        allowed_methods=list_flag(args.allowed_methods, "--allowed-methods"),
        allowed_headers=list_flag(args.allowed_headers, "--allowed-headers"),
        max_body_bytes=args.max_body_bytes,
        responses_store_size=args.responses_store_size,
        responses_store_bytes=args.responses_store_bytes,
    )
    # IPPROTO_TCP explicitly: only then does the event loop set TCP_NODELAY on
    # accepted connections (without it, Nagle + delayed ACK cost ~40 ms per
    # kept-alive request).
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings),
        http="httptools",
        log_level=args.log_level.lower(),
        log_config=None,  # our handlers (setup_logging), not uvicorn's
        access_log=False,
        timeout_graceful_shutdown=int(args.shutdown_grace),
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn exposes no event
            await asyncio.sleep(0.02)
        if server.started:
            _ready("bridge", args.host, port)
        await task

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the
    # signal: let that end the process quietly, with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        _run_loop(serve())
    except KeyboardInterrupt:
        pass


def cmd_status(args: argparse.Namespace) -> None:
    import grpc

    from tokenwire_cli.status import status

    try:
        print(status(args.controller_address, args.model))
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise SystemExit(
                f"the registry at {args.controller_address} refused this command: give the cluster's credentials "
                "(--cluster-token-file, TOKENWIRE_CLUSTER_TOKEN, or --tls-cert/--tls-key with --tls-ca)"
            ) from None
        raise SystemExit(f"cannot reach the registry at {args.controller_address}: {error.code().name}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    from tokenwire_cli.supervisor import serve

    serve(args)


# -- the parser -------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="text for people, json for machines"
    )


def _tls_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", default=None, help="serve gRPC over TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")


def _tls_client_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", default=None, help="dial tokenwire peers over TLS, trusting this CA (PEM)")


def _cluster_flags(parser: argparse.ArgumentParser, *, serving: bool) -> None:
    """Cluster credentials: what members show each other (never users' API keys)."""
    group = parser.add_argument_group("cluster credentials")
    group.add_argument(
        "--cluster-token-file", default=None, help="file holding the cluster's shared token (the way to pass it)"
    )
    group.add_argument(
        "--cluster-token",
        default=None,
        help="the cluster's shared token; better TOKENWIRE_CLUSTER_TOKEN or --cluster-token-file (ps shows flags)",
    )
    if not serving:
        return
    group.add_argument(
        "--tls-client-ca",
        default=None,
        help="mTLS: require client certificates signed by this CA (PEM); needs --tls-cert/--tls-key, "
        "which are also this part's client certificate when it dials",
    )
    group.add_argument(
        "--insecure-cluster",
        action="store_true",
        help="listen beyond loopback without cluster credentials: anyone who reaches it joins the cluster",
    )


def _metrics_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (0 = any free port)"
    )


def _gateway_flags(parser: argparse.ArgumentParser, *, with_address: bool = True) -> None:
    parser.add_argument("--api-keys", default=None, help="comma-separated API keys; none = open API")
    parser.add_argument(
        "--api-keys-file",
        default=None,
        help="one key per line, optionally 'rpm=N tpm=N' after it (keeps keys out of ps)",
    )
    parser.add_argument("--rate-limit-rpm", type=int, default=None, help="requests per minute per key (default: none)")
    parser.add_argument("--rate-limit-tpm", type=int, default=None, help="tokens per minute per key (default: none)")
    parser.add_argument(
        "--heartbeat-expiry", type=float, default=15.0, help="drop a worker after this many seconds without heartbeat"
    )
    parser.add_argument("--max-n", type=int, default=128, help="largest n (choices per request) accepted")
    parser.add_argument("--max-tokens-limit", type=int, default=1 << 20, help="largest max_tokens accepted")
    parser.add_argument(
        "--expect-models",
        default="",
        help="comma-separated models that must have a live worker for readiness (default: every model seen)",
    )


def _bridge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    parser.add_argument("--allowed-origins", default="*", help="CORS: origins, comma-separated or a JSON list")
    parser.add_argument("--allowed-methods", default="*", help="CORS: methods, comma-separated or a JSON list")
    parser.add_argument("--allowed-headers", default="*", help="CORS: headers, comma-separated or a JSON list")
    parser.add_argument("--max-body-bytes", type=int, default=10 * 1024 * 1024, help="larger request bodies get 413")
    parser.add_argument(
        "--responses-store-size", type=int, default=1000, help="stored Responses API responses kept (LRU; 0 = none)"
    )
    parser.add_argument(
        "--responses-store-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="bytes of stored responses and their conversations kept (LRU)",
    )


def _worker_flags(parser: argparse.ArgumentParser, with_engines: bool) -> None:
    parser.add_argument("--engine", choices=sorted(ENGINES), default="llama_cpp")
    parser.add_argument("--model-name", default="", help="the name clients use (default: from the model)")
    parser.add_argument("--model-path", default="", help="GGUF file or model directory (default: the embedded model)")
    parser.add_argument(
        "--worker-address", default=None, help="host:port the gateway should dial (default: host:bound port)"
    )
    parser.add_argument(
        "--limit-worker-concurrency",
        type=int,
        default=None,
        help="requests running at once (default: the llama_cpp engine's --parallel, else 5)",
    )
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get 429")
    parser.add_argument(
        "--stream-interval",
        type=_positive_int,
        default=1,
        help="tokens per streamed message (the first excepted): more means less CPU per token, "
        "less smooth streams (default 1: every token as it comes)",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=5.0)
    if not with_engines:
        return
    for name in ENGINES:
        group = parser.add_argument_group(f"{name} engine")
        module = importlib.import_module(ENGINES[name])
        module.add_arguments(group)


def build_parser(with_engines: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``with_engines=False`` leaves out the engines'
    own worker flags (and their imports: numpy, httpx), for the other parts."""
    parser = argparse.ArgumentParser(
        prog="tokenwire", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run everything on loopback with the embedded models")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address of the REST bridge and gateway (0.0.0.0 to serve a network)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help="REST bridge port")
    serve.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gateway gRPC port")
    serve.add_argument(
        "--registry-port", type=int, default=0, help="the registry's own port, on --host (default: any free port)"
    )
    serve.add_argument(
        "--controller-address", default=None, help="use this standalone registry instead of the gateway's own"
    )
    serve.add_argument(
        "--echo", action="store_true", help="serve echo test models instead of the real ones (tests, benchmarks)"
    )
    serve.add_argument("--no-embeddings", action="store_true", help="do not start the embedding worker")
    serve.add_argument(
        "--chat-model-path", default="", help="GGUF file for the chat worker (default: SmolLM2-135M-Instruct)"
    )
    serve.add_argument(
        "--embedding-model-path",
        default="",
        help="model directory for the embedding worker (default: all-MiniLM-L6-v2)",
    )
    serve.add_argument("--shutdown-grace", type=float, default=10.0)
    _cluster_flags(serve, serving=False)
    _gateway_flags(serve)
    _bridge_flags(serve)
    _common(serve)
    serve.set_defaults(func=cmd_serve)

    gateway = sub.add_parser("gateway", help="the gRPC gateway")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT)
    gateway.add_argument(
        "--controller-address", default=None, help="a standalone registry (default: host one in-process)"
    )
    gateway.add_argument("--shutdown-grace", type=float, default=10.0)
    _gateway_flags(gateway)
    gateway.add_argument(
        "--registry-port",
        type=int,
        default=None,
        help="serve the registry on this internal port instead of the public one (0 = any free port)",
    )
    gateway.add_argument("--registry-host", default=None, help="address of --registry-port (default: --host)")
    _metrics_flag(gateway)
    _tls_server_flags(gateway)
    _tls_client_flag(gateway)
    _cluster_flags(gateway, serving=True)
    _common(gateway)
    gateway.set_defaults(func=cmd_gateway)

    registry = sub.add_parser("registry", help="a standalone registry (FastChat's controller)")
    registry.add_argument("--host", default="127.0.0.1")
    registry.add_argument("--port", type=int, default=21001)
    registry.add_argument("--heartbeat-expiry", type=float, default=15.0)
    _tls_server_flags(registry)
    _cluster_flags(registry, serving=True)
    _common(registry)
    registry.set_defaults(func=cmd_registry)

    worker = sub.add_parser("worker", help="one model worker")
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=0, help="0 = any free port")
    worker.add_argument(
        "--controller-address",
        default=f"127.0.0.1:{DEFAULT_GRPC_PORT}",
        help="the registry: a gateway or a standalone registry",
    )
    worker.add_argument("--shutdown-grace", type=float, default=10.0)
    _worker_flags(worker, with_engines)
    _metrics_flag(worker)
    _tls_server_flags(worker)
    _tls_client_flag(worker)
    _cluster_flags(worker, serving=True)
    _common(worker)
    worker.set_defaults(func=cmd_worker)

    bridge = sub.add_parser("bridge", help="the OpenAI REST + SSE bridge")
    bridge.add_argument("--host", default="127.0.0.1")
    bridge.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT)
    bridge.add_argument(
        "--gateway-address",
        "--controller-address",
        default=f"127.0.0.1:{DEFAULT_GRPC_PORT}",
        help="the gateway's gRPC address (--controller-address is FastChat's name for it)",
    )
    bridge.add_argument("--shutdown-grace", type=float, default=10.0)
    _bridge_flags(bridge)
    _tls_client_flag(bridge)
    _common(bridge)
    bridge.set_defaults(func=cmd_bridge)

    status = sub.add_parser("status", help="the live workers: models, load and health")
    status.add_argument(
        "--controller-address",
        default=f"127.0.0.1:{DEFAULT_GRPC_PORT}",
        help="the registry: a gateway or a standalone registry",
    )
    status.add_argument("--model", default="", help="only this model's workers")
    _tls_client_flag(status)
    status.add_argument("--tls-cert", default=None, help="mTLS: the client certificate to present (PEM)")
    status.add_argument("--tls-key", default=None, help="mTLS: its private key (PEM)")
    _cluster_flags(status, serving=False)
    _common(status)
    status.set_defaults(func=cmd_status)

    for subparser in sub.choices.values():
        _defaults_from_env(subparser)
    return parser


def _defaults_from_env(parser: argparse.ArgumentParser) -> None:
    """TOKENWIRE_<FLAG> sets the default of --flag."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = os.environ.get(ENV_PREFIX + action.dest.upper())
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in ("1", "true", "yes", "on")
        elif action.type is not None:
            action.default = action.type(value)  # type: ignore[operator]
        else:
            action.default = value


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_engines=bool(argv) and argv[0] == "worker")
    args = parser.parse_args(argv)
    try:
        check_flag_forms(args)
    except ValueError as error:
        parser.error(str(error))
    from common import cluster
    from common.grpc_server import configure_client_tls
    from common.observability import setup_logging

    setup_logging(args.log_level, args.log_format)
    configure_client_tls(getattr(args, "tls_ca", None), getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    if hasattr(args, "cluster_token"):
        if any(arg.split("=", 1)[0] == "--cluster-token" for arg in argv):
            logging.getLogger("tokenwire").warning(
                "--cluster-token on the command line is visible to every user of this machine (ps); "
                "use --cluster-token-file or TOKENWIRE_CLUSTER_TOKEN"
            )
        if getattr(args, "tls_client_ca", None) and hasattr(args, "tls_ca") and not args.tls_ca:
            raise SystemExit(
                "--tls-client-ca needs --tls-ca too: this part dials other members, over mTLS, "
                "and must know the CA of their server certificates"
            )
        args.cluster_token = cluster.read_token(args.cluster_token, args.cluster_token_file)
        cluster.configure(args.cluster_token, mtls=bool(getattr(args, "tls_client_ca", None)))
    args.func(args)
