"""What the bridge's client span of a gateway call costs its process: a call, and a streamed message.

    .venv/bin/python -m bench.experiments.call_spans [--rounds 6] [--calls 2000] [--messages 4000]

A server process answers ``tokenwire.v1.InferenceService`` methods with no application code (a
unary call echoes, a streamed one sends ``--messages`` 120-byte messages at once). This process
calls it over two channels, interleaved round by round: ``off``, a channel as the bridge has it
while it does not trace (no interceptor), and ``on``, one with ``tracing.CallSpans``, the part
exporting its spans over OTLP/gRPC (the SDK's default batching) to the sink of
``bench/experiments/tracing_cost.py``. Per round and channel: ``--calls`` unary calls (16 at a
time) and 8 streams at once; this process's CPU (every thread: the event loop, grpc's poller, the
span exporter) from ``time.process_time``, a call's and a message's. Prints each round, then the
medians and ``on`` minus ``off``. It runs in the project's venv (the SDK and common.tracing).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc

from bench import venv

SERVICE = "tokenwire.v1.InferenceService"
PAYLOAD = b"x" * 120
STREAMS = 8


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds, off's and on's in each (6)")
    parser.add_argument("--calls", type=int, default=2000, help="unary calls a round and channel (2000)")
    parser.add_argument("--messages", type=int, default=4000, help="messages a stream (4000)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process itself
    return parser.parse_args(argv)


async def serve(messages: int) -> None:
    """The server: ``READY <address>``, then every call answered until it is stopped."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(messages):
            yield PAYLOAD

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "CreateChatCompletion": grpc.unary_unary_rpc_method_handler(unary),
            "StreamChatCompletion": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def unary_calls(channel: grpc.aio.Channel, calls: int) -> None:
    call = channel.unary_unary(f"/{SERVICE}/CreateChatCompletion")

    async def some(count: int) -> None:
        for _ in range(count):
            await call(PAYLOAD, timeout=30)

    await asyncio.gather(*(some(calls // 16) for _ in range(16)))


async def streams(channel: grpc.aio.Channel) -> int:
    call = channel.unary_stream(f"/{SERVICE}/StreamChatCompletion")

    async def one() -> int:
        return sum([1 async for _ in call(PAYLOAD, timeout=60)])

    return sum(await asyncio.gather(*(one() for _ in range(STREAMS))))


async def compare(args: argparse.Namespace, address: str, sink: str) -> None:
    from common import tracing

    traced = tracing.configure("bridge", f"http://{sink}", False, {})
    channels = {
        "off": grpc.aio.insecure_channel(address),
        "on": grpc.aio.insecure_channel(address, interceptors=traced.channel_interceptors(address)),
    }
    for channel in channels.values():  # warm: connected, the code paths run once
        await unary_calls(channel, 64)
        await streams(channel)
    call_us: dict[str, list[float]] = {name: [] for name in channels}
    message_us: dict[str, list[float]] = {name: [] for name in channels}
    for round_ in range(1, args.rounds + 1):
        order = list(channels) if round_ % 2 else list(reversed(channels))
        for name in order:
            calls = args.calls // 16 * 16
            start = time.process_time()
            await unary_calls(channels[name], calls)
            middle = time.process_time()
            received = await streams(channels[name])
            call_us[name].append((middle - start) / calls * 1e6)
            message_us[name].append((time.process_time() - middle) / received * 1e6)
            print(
                f"[{round_}/{args.rounds}] {name:3s} {call_us[name][-1]:6.1f} µs a unary call, "
                f"{message_us[name][-1]:5.2f} µs a streamed message",
                flush=True,
            )
    traced.provider.shutdown()  # what was still batched goes out (not counted)
    for channel in channels.values():
        await channel.close()
    print("\nmedians over the rounds, this process's CPU:")
    for what, figures in (("a unary call", call_us), ("a streamed message", message_us)):
        off, on = statistics.median(figures["off"]), statistics.median(figures["on"])
        print(f"  {what:18s} off {off:7.2f} µs, on {on:7.2f} µs (+{on - off:.2f} µs, {on / off:.2f}x)")


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return
    python = str(venv.PROJECT_PYTHON)
    started: list[subprocess.Popen[str]] = []
    try:
        for command in (
            [python, "-m", "bench.experiments.call_spans", "--serve", str(args.messages)],
            [python, "-m", "bench.experiments.tracing_cost", "--sink"],
        ):
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            started.append(process)
        # Each says READY and its address first.
        address, sink = (process.stdout.readline().split()[-1] for process in started if process.stdout)
        asyncio.run(compare(args, address, sink))
    finally:
        for process in started:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
