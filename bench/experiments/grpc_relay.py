"""What a gateway-shaped hop costs per streamed message: a bare grpc.aio relay, paced like tokens.

Three processes on loopback, no application code:

- a *source* serves one server stream of ``--messages`` 120-byte messages, one every
  ``--period`` seconds (a worker making tokens at one stream's pace);
- a *relay* serves the same stream and fills it from the source's (the gateway's shape:
  a gRPC client read and a gRPC server write per message);
- a *sink* in this process reads the relay's stream (the bridge's read).

Prints, as JSON, the source's and relay's CPU per message (utime + stime from /proc) and
their context switches per message (every thread's). Options go to both servers and the
channels; grpc's own settings come from the environment, so a setting can be compared:

    bench/.venv/bin/python -m bench.experiments.grpc_relay
    GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints \\
        bench/.venv/bin/python -m bench.experiments.grpc_relay
    bench/.venv/bin/python -m bench.experiments.grpc_relay --option grpc.http2.bdp_probe=0 --unix
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

METHOD = "/bench.Relay/Stream"
PAYLOAD = b"x" * 120


def _identity(data: bytes) -> bytes:
    return data


def _handler(stream: object) -> grpc.GenericRpcHandler:
    method = grpc.unary_stream_rpc_method_handler(stream, _identity, _identity)  # type: ignore[arg-type]
    return grpc.method_handlers_generic_handler("bench.Relay", {"Stream": method})


async def _serve(address: str, stream: object, options: list[tuple[str, int]]) -> None:
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((_handler(stream),))
    server.add_insecure_port(address)
    await server.start()
    print("READY", flush=True)
    await server.wait_for_termination()


async def _source(address: str, messages: int, period: float, options: list[tuple[str, int]]) -> None:
    async def stream(request: bytes, context: object):  # type: ignore[no-untyped-def]
        for _ in range(messages):
            await asyncio.sleep(period)
            yield PAYLOAD

    await _serve(address, stream, options)


async def _relay(address: str, upstream: str, options: list[tuple[str, int]]) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=options)
    call = channel.unary_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)

    async def stream(request: bytes, context: object):  # type: ignore[no-untyped-def]
        async for message in call(b""):
            yield message

    await _serve(address, stream, options)


async def _sink(address: str, options: list[tuple[str, int]]) -> int:
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)
        return sum([1 async for _ in call(b"")])


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            lines = (task / "status").read_text().splitlines()
        except FileNotFoundError:  # a thread that just ended
            continue
        total += sum(int(line.split()[1]) for line in lines if "ctxt_switches:" in line)  # voluntary + not
    return total


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(*argv: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "READY":
        raise SystemExit(f"{argv[0]} did not start")
    return process


def _parse_options(values: list[str]) -> list[tuple[str, int]]:
    return [(name, int(value)) for name, value in (v.split("=", 1) for v in values)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--period", type=float, default=0.012, help="seconds between messages (12 ms: ~80 tokens/s)")
    parser.add_argument("--option", action="append", default=[], help="a grpc channel/server option, name=int")
    parser.add_argument("--unix", action="store_true", help="Unix sockets instead of TCP on 127.0.0.1")
    parser.add_argument("--role", choices=("source", "relay"), help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = _parse_options(args.option)
    if args.role == "source":
        asyncio.run(_source(args.address, args.messages, args.period, options))
        return
    if args.role == "relay":
        asyncio.run(_relay(args.address, args.upstream, options))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.unix:
            source_address, relay_address = f"unix:{tmp}/source.sock", f"unix:{tmp}/relay.sock"
        else:
            source_address, relay_address = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
        common = ["--messages", str(args.messages), "--period", str(args.period)]
        for option in args.option:
            common += ["--option", option]
        source = _start("--role", "source", "--address", source_address, *common)
        relay = _start("--role", "relay", "--address", relay_address, "--upstream", source_address, *common)
        try:
            before = {p.pid: (_cpu_ticks(p.pid), _switches(p.pid)) for p in (source, relay)}
            started = time.monotonic()
            received = asyncio.run(_sink(relay_address, options))
            elapsed = time.monotonic() - started
            after = {p.pid: (_cpu_ticks(p.pid), _switches(p.pid)) for p in (source, relay)}
        finally:
            for process in (source, relay):
                process.kill()
                process.wait()
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, object] = {"messages": received, "period_s": args.period, "seconds": round(elapsed, 2)}
    for name, process in (("source", source), ("relay", relay)):
        ticks = after[process.pid][0] - before[process.pid][0]
        switches = after[process.pid][1] - before[process.pid][1]
        out[f"{name}_cpu_us_per_message"] = round(ticks / tick / max(received, 1) * 1e6)
        out[f"{name}_context_switches_per_message"] = round(switches / max(received, 1), 1)
    out["grpc_experiments"] = os.environ.get("GRPC_EXPERIMENTS", "")
    out["options"] = args.option
    print(json.dumps(out))


if __name__ == "__main__":
    main()
