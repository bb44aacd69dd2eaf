"""What traces cost when they are on: the front end's and the workers' CPU a request and a streamed token.

    bench/.venv/bin/python -m bench.experiments.tracing_cost [--rounds 5] [--duration 8] [--sampler-arg 1.0]

Two stacks of this tree over the ceiling's echo workers (``bench/front_ends.py``: an instant one,
and a paced one making a token a millisecond), interleaved round by round: ``off``, as shipped,
and ``on``, every process exporting its spans over OTLP/gRPC (``OTEL_EXPORTER_OTLP_ENDPOINT``,
the SDK's default batching) to a sink. By default every request is traced
(``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` with ``--sampler-arg``, 1.0). The sink is a
bare gRPC server in a process of its own: it answers the collector's ``TraceService/Export``
without decoding it, and counts what it was sent (printed at the end, to show the spans went out).

Prints each window, then for both loads the median CPU a request and a streamed token of the
front end and of the workers, ``on`` against ``off``. Tracing while off costs nothing measurable
against the code before it (``bench/before_after.py``); this is its cost on.

It runs in the bench's own venv (its load client), the servers and the sink in the project's.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import threading
from concurrent import futures

from bench import venv

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of windows, off's and on's in each (5)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds a window (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window (2)")
    parser.add_argument("--sampler-arg", default="1.0", help="the share of requests traced (1.0)")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)  # the sink process itself
    return parser.parse_args(argv)


def sink() -> None:
    """The OTLP sink: ``READY sink <address>``, then every Export answered (an empty response is
    zero bytes) and counted; the counts are printed when it is stopped."""
    import grpc

    counts = {"exports": 0, "bytes": 0}
    lock = threading.Lock()

    def export(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            counts["exports"] += 1
            counts["bytes"] += len(request)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": grpc.unary_unary_rpc_method_handler(export)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print(f"READY sink 127.0.0.1:{port}", flush=True)
    stopped.wait()
    server.stop(None)
    print(f"sink: {counts['exports']} exports, {counts['bytes']} bytes", file=sys.stderr, flush=True)


async def compare(args: argparse.Namespace) -> None:
    # The bench venv's (its load client); the sink runs on the project's, without them.
    from bench import front_ends
    from bench.servers import Group, Server

    with Group() as group:
        receiver = group.start(
            Server("otlp-sink", [str(venv.PROJECT_PYTHON), "-m", "bench.experiments.tracing_cost", "--sink"])
        )
        on = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.address}",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": args.sampler_arg,
        }
        envs: dict[str, dict[str, str]] = {"off": {}, "on": on}
        stacks = {name: front_ends.start(group, name, front_ends.echo_workers(), env=env) for name, env in envs.items()}
        figures = await front_ends.measure_ceiling(group, stacks, args.rounds, args.duration, args.warmup)
        front_ends.print_summary(figures, list(stacks))
        print("\nmedians over the rounds, the front end's and the workers' CPU, on against off:")
        for load, (unit, _) in front_ends.CEILING_LOADS.items():
            off, traced = figures[(load, "off")], figures[(load, "on")]
            for part, cpu in (("front end", "cpu_us"), ("workers", "workers_cpu_us")):
                before = statistics.median(getattr(w, cpu) for w in off)
                after = statistics.median(getattr(w, cpu) for w in traced)
                print(f"  {load:15s} {part:9s} {before:6.0f} -> {after:6.0f} µs a {unit} (+{after - before:.0f} µs)")
        receiver.stop()
        print("\n" + receiver.log().strip())


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.sink:
        sink()
        return
    venv.run_inside("bench.experiments.tracing_cost", argv)
    asyncio.run(compare(args))


if __name__ == "__main__":
    main()
