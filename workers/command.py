"""A worker's flags, declared once (its engines add their own), and how it starts."""

from __future__ import annotations

import argparse
import importlib

from common import settings

# engine name -> module providing add_arguments(group) and build(args).
ENGINES = {
    "llama_cpp": "workers.engines.llama_cpp",
    "embeddings": "workers.engines.embeddings",
    "openai": "workers.engines.openai_upstream",
    "echo": "workers.engines.echo",
}


def worker_flags(parser: argparse.ArgumentParser, with_engines: bool = True) -> None:
    """``tokenwire worker`` / ``python -m workers``; ``with_engines=False`` leaves out
    the engines' own flags (and their imports: numpy, httpx)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument(
        "--controller-address",
        default=f"127.0.0.1:{settings.DEFAULT_GRPC_PORT}",
        help="the registry: a gateway or a standalone registry",
    )
    parser.add_argument("--shutdown-grace", type=float, default=10.0)
    _worker_flags(parser, with_engines)
    settings.member_flags(parser)
    parser.set_defaults(process_environment=process_environment)


def process_environment(args: argparse.Namespace) -> dict[str, str]:
    """What this worker's process must start with: its engine's needs (llama_cpp: huge pages)."""
    module = importlib.import_module(ENGINES[args.engine])
    return module.process_environment(args) if hasattr(module, "process_environment") else {}


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
        "--reserved-slots",
        type=int,
        default=1,
        help="slots batch work never takes, kept for interactive requests (default 1; batch keeps at least one; "
        "none with the llama.cpp engine's --batch-yield preempt, which makes room for them)",
    )
    parser.add_argument(
        "--stream-interval",
        type=settings.positive_int,
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


def run(args: argparse.Namespace) -> None:
    from common import cluster, tracing
    from common.grpc_server import server_credentials
    from workers.server import run_worker

    cluster.check_listen("worker", [args.host], insecure=args.insecure_cluster)
    tracing.instrument_httpx(tracing.configure("worker", args.otlp_traces_endpoint, args.trace_content))
    tls = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    engine = importlib.import_module(ENGINES[args.engine]).build(args)
    settings.run_server(
        lambda stop: run_worker(
            engine,
            host=args.host,
            port=args.port,
            controller_address=args.controller_address,
            worker_address=args.worker_address,
            limit_worker_concurrency=args.limit_worker_concurrency or getattr(engine, "parallel", 5),
            max_queue=args.max_queue,
            reserved_slots=args.reserved_slots,
            preempt_batch=getattr(engine, "preempts_batch", False),
            stream_interval=args.stream_interval,
            heartbeat_interval=args.heartbeat_interval,
            shutdown_grace=args.shutdown_grace,
            metrics_port=args.metrics_port,
            tls=tls,
            stop=stop,
            on_ready=lambda port: settings.ready("worker", args.host, port),
        )
    )
