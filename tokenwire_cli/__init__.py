"""The ``tokenwire`` command.

    tokenwire serve      everything on loopback: gateway, bridge, one worker per default model
    tokenwire gateway    the gRPC gateway (hosts the registry unless --controller-address is given)
    tokenwire registry   a standalone registry (FastChat's controller)
    tokenwire worker     one model worker (--engine llama_cpp | embeddings | openai | echo)
    tokenwire bridge     the OpenAI REST + SSE bridge in front of a gateway
    tokenwire front-end  a gateway and a bridge in one process, as serve runs them:
                         <gateway flags> --bridge <bridge flags>
    tokenwire status     the live workers, their models, load and health
    tokenwire batch      run a JSONL file of requests as a batch (OpenAI's Batch API), with a progress bar

The composition root: nothing imports it. Each part declares its own flags
(``gateway.command``, ``workers.command``, ``rest_bridge.command``) and runs
on its own too (``python -m gateway``, ``python -m workers``, ``python -m
rest_bridge``); this command puts them under one name and adds ``serve`` and
``status``. Every flag can also come from the environment: ``--api-keys`` is
``TOKENWIRE_API_KEYS``, and so on (flags win over the environment).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import settings
from gateway import command as gateway_command
from rest_bridge import command as bridge_command
from workers import command as worker_command


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


def cmd_batch(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tokenwire_cli.batch import run_batch

    path = Path(args.file)
    if not path.is_file():
        raise SystemExit(f"no such file: {path}")
    batch = run_batch(
        args.url,
        path,
        api_key=args.api_key,
        endpoint=args.endpoint,
        output=Path(args.output or path.with_suffix(".output.jsonl")),
        errors=Path(args.errors or path.with_suffix(".errors.jsonl")),
    )
    if batch["status"] != "completed":
        raise SystemExit(1)


def cmd_serve(args: argparse.Namespace) -> None:
    from tokenwire_cli.supervisor import serve

    serve(args)


# -- the parser -------------------------------------------------------------------


def build_parser(with_engines: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``with_engines=False`` leaves out the engines'
    own worker flags (and their imports: numpy, httpx), for the other parts."""
    parser = settings.FlagParser(
        prog="tokenwire", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run everything on loopback with the embedded models")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address of the REST bridge and gateway (0.0.0.0 to serve a network)"
    )
    serve.add_argument("--port", type=int, default=settings.DEFAULT_HTTP_PORT, help="REST bridge port")
    serve.add_argument("--grpc-port", type=int, default=settings.DEFAULT_GRPC_PORT, help="gateway gRPC port")
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
        "--split-front-end",
        action="store_true",
        help="run the gateway and the REST bridge as two processes (default: one, which spends less CPU a "
        "streamed token; two keep more of the non-streamed ceiling where cores are spare)",
    )
    serve.add_argument(
        "--chat-model-path", default="", help="GGUF file for the chat worker (default: SmolLM2-135M-Instruct)"
    )
    serve.add_argument(
        "--embedding-model-path",
        default="",
        help="model directory for the embedding worker (default: all-MiniLM-L6-v2)",
    )
    serve.add_argument("--shutdown-grace", type=float, default=10.0)
    settings.cluster_flags(serve, serving=False)
    gateway_command.api_flags(serve)
    bridge_command.api_flags(serve)
    settings.store_flags(serve)
    settings.message_limit_flags(serve)
    settings.tracing_flags(serve)
    settings.logging_flags(serve)
    serve.set_defaults(func=cmd_serve)

    gateway = sub.add_parser("gateway", help="the gRPC gateway")
    gateway_command.gateway_flags(gateway)
    gateway.set_defaults(func=gateway_command.run)

    registry = sub.add_parser("registry", help="a standalone registry (FastChat's controller)")
    gateway_command.registry_flags(registry)
    registry.set_defaults(func=gateway_command.run_registry)

    worker = sub.add_parser("worker", help="one model worker")
    worker_command.worker_flags(worker, with_engines)
    worker.set_defaults(func=worker_command.run)

    bridge = sub.add_parser("bridge", help="the OpenAI REST + SSE bridge")
    bridge_command.bridge_flags(bridge)
    bridge.set_defaults(func=bridge_command.run)

    status = sub.add_parser("status", help="the live workers: models, load and health")
    status.add_argument(
        "--controller-address",
        default=f"127.0.0.1:{settings.DEFAULT_GRPC_PORT}",
        help="the registry: a gateway or a standalone registry",
    )
    status.add_argument("--model", default="", help="only this model's workers")
    settings.tls_client_flag(status)
    status.add_argument("--tls-cert", default=None, help="mTLS: the client certificate to present (PEM)")
    status.add_argument("--tls-key", default=None, help="mTLS: its private key (PEM)")
    settings.cluster_flags(status, serving=False)
    settings.logging_flags(status)
    status.set_defaults(func=cmd_status)

    batch = sub.add_parser(
        "batch", help="run a JSONL file of requests as a batch, with a progress bar (Ctrl-C cancels it)"
    )
    batch.add_argument("file", help="the requests, one per line: {custom_id, method, url, body}, as OpenAI's")
    batch.add_argument(
        "--url", default=f"http://127.0.0.1:{settings.DEFAULT_HTTP_PORT}/v1", help="the REST API (default: %(default)s)"
    )
    batch.add_argument("--api-key", default=None, help="the key to use (TOKENWIRE_API_KEY)")
    batch.add_argument("--endpoint", default=None, help="the batch's endpoint (default: the first line's url)")
    batch.add_argument("--output", default=None, help="where the results go (default: <file>.output.jsonl)")
    batch.add_argument("--errors", default=None, help="where failed requests go (default: <file>.errors.jsonl)")
    settings.logging_flags(batch)
    batch.set_defaults(func=cmd_batch)

    for subparser in sub.choices.values():
        settings.defaults_from_env(subparser)  # FlagParsers, like their parent
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["front-end"]:  # serve's: two parts' flags (tokenwire_cli/front_end.py)
        from tokenwire_cli import front_end

        front_end.main(argv[1:])
        return
    parser = build_parser(with_engines=bool(argv) and argv[0] == "worker")
    args = parser.parse_args(argv)
    settings.configure_process(parser, args, argv)
    args.func(args)
