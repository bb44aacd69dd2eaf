"""The shared store's cost a request, and what a second front end gives (issue 31), interleaved.

    .venv/bin/python -m bench.shared_store [--rounds 3] [--duration 8] [--warmup 2]

A redis-server (Debian's, ``make redis``) started here. Then two measurements, each in rounds
whose windows take turns (the order reversed every other round, as ``bench/front_ends.py``
does), each window saying what share of the machine other processes used:

1. **The store's cost**: two one-process front ends (``tokenwire front-end``), each over its own
   echo workers (``front_ends.echo_workers``), one with ``--store memory`` and one with
   ``--store redis://``; both with default per-key limits far above the load
   (``--rate-limit-rpm``, ``--rate-limit-tpm``), so that every request is admitted by a script
   and its tokens counted by another in one, and in memory in the other. Loads: the
   non-streamed chat at 1 client (latency p50/p99: what the round trips add), at 32 (the front
   end's CPU a request at its ceiling), the paced stream at 8 (CPU a request and a streamed
   token), and the Responses API at 8 (each response stored: one more script). Redis's own CPU
   a request is given apart: on a fleet it runs elsewhere.
2. **Two front ends against one**: a front end and its echo workers, and a second front end
   over the same workers (its gateway follows the first's registry), both on the Redis store.
   The non-streamed chat at 32 clients and the paced stream at 8 go to the first alone, then
   to both, the client alternating between them as a round-robin balancer would: requests
   (tokens) a second at saturation, and the ratio.

It runs in ``bench/.venv`` (the load client), and re-executes itself there.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
from dataclasses import dataclass

from bench import venv

RATE_LIMITS = {"TOKENWIRE_RATE_LIMIT_RPM": "100000000", "TOKENWIRE_RATE_LIMIT_TPM": "100000000000"}


@dataclass
class Window:
    rate: float  # requests (tokens) a second
    cpu_us: float  # the front ends' CPU a request (a token)
    store_us: float  # redis-server's CPU a request (a token)
    p50_ms: float | None
    p99_ms: float | None
    other: float  # the share of the machine other processes used


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of windows (3)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds a window (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window (2)")
    parser.add_argument("--only", choices=("cost", "saturation"), default=None, help="one of the two measurements")
    return parser.parse_args(argv)


def _loads() -> dict[str, tuple[str, int, str, dict[str, object]]]:
    """name -> (what CPU is counted per, clients, path, body)."""
    from bench.front_ends import CEILING_LOADS
    from bench.suite import CHAT_MODEL, CHAT_TOKENS, WORDS, chat_body

    responses = {"model": CHAT_MODEL, "input": WORDS, "max_output_tokens": CHAT_TOKENS}
    return {
        "chat_c1": ("request", 1, "/v1/chat/completions", chat_body(CHAT_TOKENS)),
        "chat_c32": ("request", 32, "/v1/chat/completions", CEILING_LOADS["chat_c32"][1]),
        "stream_paced_c8": ("token", 8, "/v1/chat/completions", CEILING_LOADS["stream_paced_c8"][1]),
        "responses_c8": ("request", 8, "/v1/responses", responses),
    }


async def _window(group, clients, fronts, store, load, warmup, duration):  # type: ignore[no-untyped-def]
    from bench import loadgen
    from bench.suite import STREAM_TOKENS

    unit, concurrency, path, body = _loads()[load]
    ops = [http.stream(path, body) if unit == "token" else http.post(path, body) for http in clients]
    turn = itertools.cycle(ops)

    async def op() -> loadgen.Sample:  # the clients in turn: a round-robin balancer
        return await next(turn)()

    result = await loadgen.run(load, op, concurrency, warmup, duration, group.servers)
    if result.errors:
        print(f"  {result.errors} errors, the first: {result.first_error}", flush=True)
    count = result.requests * (STREAM_TOKENS if unit == "token" else 1)
    front = sum(result.server_cpu[server.name] for server in fronts)
    capacity = len(os.sched_getaffinity(0))
    summary = result.summary()
    return Window(
        count / result.duration,
        1e6 * front / max(1, count),
        1e6 * result.server_cpu.get(store.name, 0.0) / max(1, count),
        summary["p50_ms"],
        summary["p99_ms"],
        result.other_cpu / (result.duration * capacity),
    )


def _print_window(round_: int, rounds: int, load: str, name: str, window: Window, unit: str) -> None:
    latency = f"p50 {window.p50_ms:6.1f} ms p99 {window.p99_ms:6.1f} ms" if window.p50_ms is not None else ""
    print(
        f"[{round_ + 1}/{rounds}] {load:15s} {name:8s} {window.rate:7.0f} {unit}s/s, front end {window.cpu_us:5.0f} µs "
        f"a {unit} (redis {window.store_us:4.0f} µs), {latency}, other processes {100 * window.other:3.0f}%",
        flush=True,
    )


async def _rounds(group, setups, store, loads, args):  # type: ignore[no-untyped-def]
    """(load, setup name) -> windows; a setup is (its HTTP clients, its front-end servers)."""
    figures: dict[tuple[str, str], list[Window]] = {}
    for round_ in range(args.rounds):
        for load in loads:
            turn = list(setups.items())
            for name, (clients, fronts) in turn if round_ % 2 == 0 else reversed(turn):
                window = await _window(group, clients, fronts, store, load, args.warmup, args.duration)
                figures.setdefault((load, name), []).append(window)
                _print_window(round_, args.rounds, load, name, window, _loads()[load][0])
    return figures


def _summary(figures: dict[tuple[str, str], list[Window]], names: list[str], loads: list[str]) -> None:
    first = names[0]
    print(f"\nmedians over the rounds (range), against {first}'s:")
    for load in loads:
        unit = _loads()[load][0]
        print(f"  {load}: the front ends' CPU a {unit}, {unit}s a second, latency")
        for name in names:
            windows = figures[(load, name)]
            cpu = [w.cpu_us for w in windows]
            p50 = [w.p50_ms or 0 for w in windows]
            p99 = [w.p99_ms or 0 for w in windows]
            line = (
                f"    {name:8s} {statistics.median(cpu):5.0f} µs ({min(cpu):.0f}-{max(cpu):.0f}) "
                f"at {statistics.median(w.rate for w in windows):7.0f}/s, p50 {statistics.median(p50):.1f} ms "
                f"p99 {statistics.median(p99):.1f} ms, redis {statistics.median(w.store_us for w in windows):.0f} µs"
            )
            if name != first:
                base = figures[(load, first)]
                cpu_ratio = statistics.median(cpu) / statistics.median(w.cpu_us for w in base)
                rate_ratio = statistics.median(w.rate for w in windows) / statistics.median(w.rate for w in base)
                line += f"  {cpu_ratio:.2f}x the CPU, {rate_ratio:.2f}x the rate"
            print(line)


async def main_async(args: argparse.Namespace) -> None:
    from bench import front_ends, loadgen, servers
    from bench.servers import Group
    from bench.suite import wait_models

    with Group() as group:
        store = group.start(servers.redis_server("redis"))
        redis_env = {**RATE_LIMITS, "TOKENWIRE_STORE": f"redis://{store.address}/0"}
        clients: list[loadgen.HttpClient] = []

        def client(stack: front_ends.Stack) -> loadgen.HttpClient:
            clients.append(loadgen.HttpClient(stack.base))
            return clients[-1]

        try:
            if args.only in (None, "cost"):
                print("\n== the store's cost: --store memory against --store redis://, one front end each", flush=True)
                memory = front_ends.start(group, "memory", front_ends.echo_workers(), env=RATE_LIMITS)
                redis = front_ends.start(group, "redis", front_ends.echo_workers(), env=redis_env)
                setups = {"memory": ([client(memory)], memory.front), "redis": ([client(redis)], redis.front)}
                loads = list(_loads())
                _summary(await _rounds(group, setups, store, loads, args), list(setups), loads)
                done = [server for server in group.servers if server.name.startswith(("memory-", "redis-"))]
                for server in done:  # out of the way of the next measurement, and of its CPU counts
                    server.stop()
                    group.servers.remove(server)
            if args.only in (None, "saturation"):
                print("\n== two front ends against one, over the same workers, on the Redis store", flush=True)
                first = front_ends.start(group, "fleet-a", front_ends.echo_workers(), env=redis_env)
                gateway = first.front[0].part_address("gateway")
                quiet = ("--port", "0", "--log-level", "warning")
                argv = ("front-end", *quiet, "--controller-address", gateway, "--bridge", *quiet)
                second_front = group.start(servers.tokenwire("fleet-b-front-end", *argv, env=redis_env))
                second = front_ends.Stack(f"http://{second_front.part_address('bridge')}", [second_front], [])
                wait_models(second.base, list(front_ends.echo_workers()))
                setups = {
                    "one": ([client(first)], first.front),
                    "two": ([client(first), client(second)], [*first.front, *second.front]),
                }
                loads = ["chat_c32", "stream_paced_c8"]
                _summary(await _rounds(group, setups, store, loads, args), list(setups), loads)
        finally:
            for http in clients:
                await http.close()


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)  # --help before any install
    venv.run_inside("bench.shared_store", argv)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
