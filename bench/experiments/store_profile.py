"""Where the Redis store's extra front-end CPU goes, by function, in µs a request (issue 31).

    .venv/bin/python -m bench.experiments.store_profile [--seconds 10] [--loads chat_c1,chat_c32]

The two one-process front ends of ``bench/shared_store.py`` (``--store memory`` and ``--store
redis://``, both with per-key limits far above the load), each under the same load in turn while
py-spy (``bench/profiling.py``, 250 Hz, ``--nonblocking``) records it. A sample is 4 ms of a
Python thread's busy time, so ``samples x 4 ms / requests`` is a function's CPU a request: its
self time (the leaf frame) and its inclusive time (anywhere on the stack), for both stores side by
side, sorted by the difference. gRPC's C-core threads are not sampled (the process's CPU a
request, from ``/proc``, is printed beside the sampled total). py-spy's sampling slows the process
a little: read these as where the difference goes, and ``bench/shared_store.py`` for how big it is.
It runs in ``bench/.venv`` (py-spy), and re-executes itself there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
from pathlib import Path

from bench import venv

RATE = 250  # py-spy samples a second


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds a profile (10)")
    parser.add_argument("--loads", default="chat_c1,chat_c32", help="loads of bench/shared_store.py, comma-separated")
    parser.add_argument("--top", type=int, default=25, help="functions listed a table (25)")
    parser.add_argument("--out", default="/tmp/store_profile", help="folder of py-spy's raw profiles")
    return parser.parse_args(argv)


def _per_request(path: Path, requests: int) -> tuple[collections.Counter[str], collections.Counter[str], float]:
    """(self µs, inclusive µs) a request by function, and the sampled total µs a request."""
    from bench import profiling

    profile = profiling.parse(path)
    scale = 1e6 / RATE / max(1, requests)
    own = collections.Counter({name: count * scale for name, count in profile.self_counts.items()})
    total = collections.Counter({name: count * scale for name, count in profile.total_counts.items()})
    return own, total, profile.samples * scale


def _table(title: str, memory: collections.Counter[str], redis: collections.Counter[str], top: int) -> None:
    names = sorted(set(memory) | set(redis), key=lambda n: -abs(redis[n] - memory[n]))[:top]
    print(f"  {title}: memory, redis, difference (µs a request)")
    for name in names:
        print(f"    {memory[name]:7.1f} {redis[name]:7.1f} {redis[name] - memory[name]:+7.1f}  {name}")


async def main_async(args: argparse.Namespace) -> None:
    from bench import front_ends, loadgen, profiling, servers
    from bench.servers import Group
    from bench.shared_store import RATE_LIMITS, _loads

    out = Path(args.out)
    with Group() as group:
        store = group.start(servers.redis_server("redis"))
        redis_env = {**RATE_LIMITS, "TOKENWIRE_STORE": f"redis://{store.address}/0"}
        stacks = {
            "memory": front_ends.start(group, "memory", front_ends.echo_workers(), env=RATE_LIMITS),
            "redis": front_ends.start(group, "redis", front_ends.echo_workers(), env=redis_env),
        }
        for load in args.loads.split(","):
            unit, concurrency, path, body = _loads()[load]
            figures = {}
            for name, stack in stacks.items():
                http = loadgen.HttpClient(stack.base)
                op = http.stream(path, body) if unit == "token" else http.post(path, body)
                run = asyncio.create_task(loadgen.run(load, op, concurrency, 1.0, args.seconds + 1.0, group.servers))
                await asyncio.sleep(1.5)
                target = out / f"{name}-{load}.txt"
                spy = profiling.record(stack.front[0].pid, args.seconds, target, rate=RATE)
                await asyncio.to_thread(spy.communicate)
                result = await run
                await http.close()
                # The profile's requests: the window's rate over the profile's seconds.
                requests = round(result.requests / result.duration * args.seconds)
                cpu = 1e6 * sum(result.server_cpu[s.name] for s in stack.front) / max(1, result.requests)
                other = result.other_cpu / (result.duration * len(os.sched_getaffinity(0)))
                own, total, sampled = _per_request(target, requests)
                figures[name] = (own, total)
                print(
                    f"{load} {name}: {result.requests / result.duration:.0f} requests/s, front end {cpu:.0f} µs "
                    f"a request (/proc), sampled {sampled:.0f} µs, other processes {100 * other:.0f}%",
                    flush=True,
                )
            _table(f"{load}, self", figures["memory"][0], figures["redis"][0], args.top)
            _table(f"{load}, inclusive", figures["memory"][1], figures["redis"][1], args.top)


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    venv.run_inside("bench.experiments.store_profile", argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
