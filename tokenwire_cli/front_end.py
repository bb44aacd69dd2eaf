"""``tokenwire front-end``: the gateway and the REST bridge in one process, as ``serve`` runs them.

    tokenwire front-end <gateway flags> --bridge <bridge flags>

The bridge still calls the gateway over gRPC, on loopback (its ``--gateway-address`` is the
gateway started here). In one process the two parts share one event loop and one set of gRPC
threads: on a machine whose engine uses every core (llama.cpp on a small box) that is 10-30% less
CPU a streamed token, and 1-6% more tokens/s from the engine, for 18-31% of the front end's
non-streamed ceiling (bench/RESULTS.md, "Engine concurrency": "One process against two" and
"grpc's classic poller").
``serve --split-front-end``, or ``tokenwire gateway`` and ``tokenwire bridge``, run them apart.

On SIGTERM/SIGINT the bridge drains its open requests first (through the gateway, still serving),
then the gateway stops.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common import addresses, settings
from gateway import command as gateway_command
from rest_bridge import command as bridge_command

if TYPE_CHECKING:
    import uvicorn

BRIDGE = "--bridge"


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(gateway args, bridge args), each parsed and checked by its own part's flags."""
    from tokenwire_cli import build_parser

    argv = list(argv)
    if BRIDGE not in argv:
        raise SystemExit(f"usage: tokenwire front-end <gateway flags> {BRIDGE} <bridge flags>")
    cut = argv.index(BRIDGE)
    parser = build_parser(with_engines=False)
    parts = {"bridge": ["bridge", *argv[cut + 1 :]], "gateway": ["gateway", *argv[:cut]]}
    parsed = {part: parser.parse_args(part_argv) for part, part_argv in parts.items()}
    if parsed["bridge"].tls_ca != parsed["gateway"].tls_ca:
        raise SystemExit(
            "tokenwire front-end: give the gateway and the bridge the same --tls-ca (one process dials with one)"
        )
    # The gateway's last: process-wide settings (message limits, cluster credentials, the client
    # TLS both parts dial with) are its.
    for part, part_argv in parts.items():
        settings.configure_process(parser, parsed[part], part_argv)
    return parsed["gateway"], parsed["bridge"]


async def serve(gateway_args: argparse.Namespace, bridge_args: argparse.Namespace) -> None:
    stop = asyncio.Event()  # the gateway's
    bridge: uvicorn.Server | None = None

    def on_signal() -> None:
        if bridge is None:
            stop.set()  # still starting
        else:
            bridge.should_exit = True  # it drains; then the gateway stops, below

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    bound: asyncio.Future[int] = loop.create_future()
    gateway = asyncio.create_task(gateway_command.serving(gateway_args, stop, on_ready=bound.set_result))
    await asyncio.wait([gateway, bound], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
    try:
        if bound.done() and not stop.is_set():
            bridge_args.gateway_address = addresses.local(gateway_args.host, bound.result())
            bridge, sock = bridge_command.server(bridge_args)
            await bridge_command.serving(bridge_args, bridge, sock)
    finally:
        stop.set()
        await gateway


def main(argv: Sequence[str]) -> None:
    gateway_args, bridge_args = parse(argv)
    gateway_command.check(gateway_args)
    settings.run_loop(serve(gateway_args, bridge_args))
