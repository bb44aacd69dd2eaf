"""Flags every part shares, read the same way everywhere, and running a part as a process.

Each part declares its own flags once (``gateway.command``, ``workers.command``,
``rest_bridge.command``) with the helpers here; ``tokenwire <part>`` and
``python -m <part>`` build their parsers from those declarations. Every flag
can also come from the environment, ``TOKENWIRE_`` + its name (flags win).
Each server prints ``READY <part> <host>:<port>`` on stdout once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from common import addresses, store

ENV_PREFIX = "TOKENWIRE_"
DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8000
# The REST bridge's --max-body-bytes, and the default gRPC message limit of the gateway
# and the workers (--max-receive-message-length, --max-send-message-length).
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024

# FastChat takes these as JSON lists ('["*"]'); tokenwire's own form is comma-separated.
LIST_FLAGS = {
    "allowed_origins": "--allowed-origins",
    "allowed_methods": "--allowed-methods",
    "allowed_headers": "--allowed-headers",
    "allowed_hosts": "--allowed-hosts",
}
# Flags that take an address, in FastChat's URL form too (addresses.from_url).
ADDRESS_FLAGS = ("controller_address", "gateway_address", "worker_address")


def ready(part: str, host: str, port: int) -> None:
    print(f"READY {part} {addresses.join(host, port)}", flush=True)


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return number


def positive_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {value}")
    return seconds


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return number


def split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


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
        return split(text)
    raise ValueError(f"{flag} must be a JSON list of strings ('[\"*\"]') or comma-separated (a,b), not {value!r}")


def check_flag_forms(args: argparse.Namespace) -> None:
    """Normalise FastChat's flag forms in place; ValueError names a bad flag."""
    for dest, flag in LIST_FLAGS.items():
        if hasattr(args, dest):
            list_flag(getattr(args, dest), flag)
    for dest in ADDRESS_FLAGS:
        if hasattr(args, dest):
            setattr(args, dest, addresses.from_url(getattr(args, dest)))


# -- flags more than one part declares ------------------------------------------------


def logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="text for people, json for machines"
    )


def tls_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", default=None, help="serve gRPC over TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")


def tls_client_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", default=None, help="dial tokenwire peers over TLS, trusting this CA (PEM)")


def cluster_flags(parser: argparse.ArgumentParser, *, serving: bool) -> None:
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


def message_limit_flags(parser: argparse.ArgumentParser) -> None:
    """gRPC message size limits of a server and its channels (the gateway's, the workers', serve's)."""
    parser.add_argument(
        "--max-receive-message-length",
        type=positive_int,
        default=None,
        help="largest gRPC message accepted, in bytes; larger get RESOURCE_EXHAUSTED (413 through the bridge) "
        f"(default: the bridge's --max-body-bytes, {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--max-send-message-length",
        type=positive_int,
        default=None,
        help=f"largest gRPC message sent, in bytes (default: the bridge's --max-body-bytes, {DEFAULT_MAX_BODY_BYTES})",
    )


def keepalive_flags(parser: argparse.ArgumentParser) -> None:
    """gRPC keepalive of a part's channels and servers (common/grpc_server.py, Keepalive)."""
    parser.add_argument(
        "--grpc-keepalive-interval",
        default=None,
        metavar="SECONDS",
        help="gRPC channels ping a peer after this long without traffic, and dial a lost one again at most this "
        "far apart; servers accept pings half as far apart (default 8; give every part the same)",
    )
    parser.add_argument(
        "--grpc-keepalive-timeout",
        default=None,
        metavar="SECONDS",
        help="a ping (or data) unanswered this long closes the connection: a peer gone silent is given up "
        "within interval + timeout, and its calls fail (default 4)",
    )


def metrics_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (0 = any free port)"
    )


def store_flags(parser: argparse.ArgumentParser) -> None:
    """The shared store (common/store.py): every part that keeps shared state (the gateway, the
    bridge) declares it, and serve, which passes it to both."""
    parser.add_argument(
        "--store",
        default=store.MEMORY,
        help="where state the front ends share lives: memory (this process) or redis://host:port/db "
        "(rediss:// for TLS), one Redis or Valkey for every replica",
    )
    parser.add_argument(
        "--store-password-file",
        default=None,
        help=f"file holding the store's password (or {store.PASSWORD_ENV}; never in --store)",
    )
    parser.add_argument(
        "--store-timeout-ms",
        type=positive_int,
        default=store.DEFAULT_TIMEOUT_MS,
        help="deadline of one store command, in milliseconds; past it the store counts as down",
    )


def tracing_flags(parser: argparse.ArgumentParser) -> None:
    """OpenTelemetry traces (common/tracing.py): the gateway's, a worker's, the bridge's, and serve's."""
    parser.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        help="send traces over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317 (default: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; neither: no traces)",
    )
    parser.add_argument(
        "--trace-content",
        action="store_true",
        help="record prompt and completion text on the spans (default: never)",
    )


def member_flags(parser: argparse.ArgumentParser) -> None:
    """What a cluster member serving gRPC and dialing its peers takes (the gateway, a worker)."""
    message_limit_flags(parser)
    keepalive_flags(parser)
    metrics_flag(parser)
    tracing_flags(parser)
    tls_server_flags(parser)
    tls_client_flag(parser)
    cluster_flags(parser, serving=True)
    logging_flags(parser)


class FlagAdder(Protocol):
    """What declares flags: a parser, or one of its argument groups."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action: ...


class _RecordingGroup:
    """An argument group that records the flags declared in it on its parser."""

    def __init__(self, group: FlagAdder, flags: list[argparse.Action]) -> None:
        self._group = group
        self._flags = flags

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self._group.add_argument(*args, **kwargs)
        self._flags.append(action)
        return action


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that keeps the flags declared on it (and its groups): the
    Actions ``add_argument`` returns. :func:`defaults_from_env` reads them, so the
    environment needs no argparse internals. Its subparsers are FlagParsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: list[argparse.Action] = []  # before __init__, which declares --help
        self.declaring = False  # __init__ makes its own groups: those stay argparse's
        super().__init__(*args, **kwargs)
        self.declaring = True

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags.append(action)
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        group = super().add_argument_group(*args, **kwargs)
        return _RecordingGroup(group, self.flags) if self.declaring else group


def env_name(dest: str) -> str:
    """The environment variable of the flag whose destination is ``dest``: TOKENWIRE_<FLAG>."""
    return ENV_PREFIX + dest.upper()


def defaults_from_env(parser: FlagParser) -> None:
    """TOKENWIRE_<FLAG> sets the default of --flag."""
    for action in parser.flags:
        if not action.option_strings or action.dest == "help":
            continue
        value = os.environ.get(env_name(action.dest))
        if value is None:
            continue
        if action.nargs == 0 and action.const is True:  # store_true
            action.default = value.strip().lower() in ("1", "true", "yes", "on")
        elif action.type is not None:
            action.default = action.type(value)  # type: ignore[operator]
        else:
            action.default = value


# -- a part as a process ----------------------------------------------------------


def configure_process(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """What every process does first: its flags' forms, logs, TLS, gRPC limits and keepalive, cluster credentials."""
    from common import cluster
    from common.grpc_server import Keepalive, configure_client_tls, configure_keepalive, configure_message_limits
    from common.observability import setup_logging

    # First, before any file is read: a token file may be a pipe that gives its secret once.
    environment = getattr(args, "process_environment", None)
    if environment is not None:
        restart_with(environment(args))
    try:
        check_flag_forms(args)
        if hasattr(args, "grpc_keepalive_interval"):  # flags (their defaults from the environment)
            keepalive = Keepalive.parse(args.grpc_keepalive_interval, args.grpc_keepalive_timeout)
        else:  # serve and status: the environment, which serve's parts inherit
            keepalive = Keepalive.from_env(os.environ)
    except ValueError as error:
        parser.error(str(error))
    setup_logging(args.log_level, args.log_format)
    configure_client_tls(getattr(args, "tls_ca", None), getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    # The bridge has no such flags: its channel carries what its bodies hold.
    body = getattr(args, "max_body_bytes", None)
    configure_message_limits(
        getattr(args, "max_receive_message_length", None) or body,
        getattr(args, "max_send_message_length", None) or body,
    )
    configure_keepalive(keepalive)
    if hasattr(args, "store"):
        store.check_flags(args, argv)
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


def restart_with(env: dict[str, str]) -> None:
    """Run this same command again with ``env`` added, if it is not there yet: for what only a
    process's start reads (glibc's tunables). ``exec``: the same pid, arguments and stdio, so a
    supervisor (``tokenwire serve``, systemd) sees one process. A part's flags may set
    ``process_environment`` (args -> env); :func:`configure_process` calls this with it first."""
    if all(os.environ.get(name) == value for name, value in env.items()):
        return
    os.environ.update(env)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, sys.orig_argv)


def run_part(
    prog: str,
    add_flags: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None = None,
) -> None:
    """``python -m <part>``: the part's own flags, then the part."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = FlagParser(prog=prog)
    add_flags(parser)
    defaults_from_env(parser)
    args = parser.parse_args(argv)
    configure_process(parser, args, argv)
    run(args)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
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


def run_server(main: Callable[[asyncio.Event], Any]) -> None:
    """Run a server coroutine until SIGTERM/SIGINT."""
    from common.grpc_server import stop_event_on_signals

    async def runner() -> None:
        await main(stop_event_on_signals())

    run_loop(runner())
