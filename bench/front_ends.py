"""Front ends side by side: start stacks over the same workers, and measure each front end alone.

A stack is a front end (one process, as ``tokenwire serve`` runs it, or the gateway and the bridge
apart) and its workers. Over the REST section's echo chat workers (``suite.py``: an instant one,
and a paced one making a token a millisecond, each token its own message and SSE chunk unless the
worker falls behind) the front end bounds what the stack carries: its ceiling.
:func:`measure_ceiling` drives the stacks with the REST section's non-streamed chat at 32 clients
and its paced stream at 8, in rounds: every stack's window of one load, then the next load, then
the next round, so that all the stacks see the same machine; the stacks take turns in the opposite
order every other round (A B, then B A), so that none is always first. A window gives the rate,
the front end's CPU (``/proc``) a request or a streamed token, and the share of the machine other
processes used meanwhile. As everywhere in the bench, only requests completed in the window count,
while the CPU is all the window's: a window must hold many paced streams (256 tokens each, ~30 a
second on a quiet machine) for the streams cut at its edges not to matter.

Used by ``bench/before_after.py`` (a commit's tree against this one) and
``bench/experiments/front_end_variants.py`` (variants of this tree).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

from bench import loadgen, servers
from bench.servers import Group, Server
from bench.suite import (
    CHAT_MODEL,
    CHAT_TOKENS,
    LOADS,
    MAX_QUEUE,
    PACE,
    PACED_MODEL,
    STREAM_TOKENS,
    WORKER_CONCURRENCY,
    chat_body,
    start_engine_stack,
    wait_models,
)

PATH = "/v1/chat/completions"
# The ceiling's loads: name -> (what its CPU is counted per, the request body).
CEILING_LOADS = {
    "chat_c32": ("request", chat_body(CHAT_TOKENS)),
    "stream_paced_c8": ("token", chat_body(STREAM_TOKENS, stream=True, model=PACED_MODEL)),
}


@dataclass
class Stack:
    base: str  # the REST base URL
    front: list[Server]  # the front end's processes


@dataclass
class Window:
    rate: float  # requests (tokens) a second
    cpu_us: float  # the front end's CPU a request (a token)
    other: float  # the share of the machine other processes used


def echo_workers() -> dict[str, tuple[str, ...]]:
    """The REST section's instant and paced echo chat workers: model name -> ``--engine ...`` arguments."""
    common = ("--limit-worker-concurrency", WORKER_CONCURRENCY, "--max-queue", MAX_QUEUE)
    return {
        model: ("echo", *common, "--echo-tokens", str(STREAM_TOKENS), "--echo-delay", str(delay))
        for model, delay in ((CHAT_MODEL, 0), (PACED_MODEL, PACE))
    }


def start(
    group: Group, name: str, workers: dict[str, tuple[str, ...]], split: bool = False, env: dict[str, str] | None = None
) -> Stack:
    """A front end named ``name`` over ``workers`` (model name -> its ``--engine ...`` arguments),
    every process with ``env`` added to its environment."""
    (model, (engine, *engine_args)), *others = workers.items()
    stack = start_engine_stack(group, model, engine, *engine_args, prefix=name, split=split, env=env)
    for model, (engine, *engine_args) in others:
        group.start(
            servers.tokenwire(
                f"{name}-worker-{model}", "worker", "--port", "0", "--controller-address", stack.gateway_address,
                "--engine", engine, "--model-name", model, "--log-level", "warning", *engine_args, env=env,
            ),
            timeout=300,
        )  # fmt: skip
    wait_models(stack.base, list(workers))
    return Stack(stack.base, stack.front)


async def measure_ceiling(
    group: Group, stacks: dict[str, Stack], rounds: int, duration: float, warmup: float = 2.0
) -> dict[tuple[str, str], list[Window]]:
    """(load, stack name) -> one window a round, each printed as it ends; ``group`` holds every stack."""
    capacity = len(os.sched_getaffinity(0))
    figures: dict[tuple[str, str], list[Window]] = {}
    clients = {name: loadgen.HttpClient(stack.base) for name, stack in stacks.items()}
    try:
        for round_ in range(rounds):
            for load, (unit, body) in CEILING_LOADS.items():
                turn = list(stacks.items())
                for name, stack in turn if round_ % 2 == 0 else reversed(turn):
                    http = clients[name]
                    op = http.stream(PATH, body) if unit == "token" else http.post(PATH, body)
                    # Every process of the group is timed, so that "other" is the rest of the machine.
                    result = await loadgen.run(load, op, LOADS[load][1], warmup, duration, group.servers)
                    count = result.requests * (STREAM_TOKENS if unit == "token" else 1)
                    front = sum(result.server_cpu[server.name] for server in stack.front)
                    other = result.other_cpu / (result.duration * capacity)
                    window = Window(count / result.duration, 1e6 * front / max(1, count), other)
                    figures.setdefault((load, name), []).append(window)
                    print(
                        f"[{round_ + 1}/{rounds}] {load:15s} {name:12s} {window.rate:7.0f} {unit}s/s, front end "
                        f"{window.cpu_us:5.0f} µs of CPU a {unit}, other processes {100 * other:3.0f}% of the machine, "
                        f"{result.errors} errors",
                        flush=True,
                    )
    finally:
        for http in clients.values():
            await http.close()
    return figures


def print_summary(figures: dict[tuple[str, str], list[Window]], names: list[str]) -> None:
    """Each stack's medians over the rounds (their range in brackets), and each against the first:
    the ratio of the medians, and the range of the ratios of the windows of one round."""
    first = names[0]
    print(f"\nmedians over the rounds (range), against {first}'s:")
    for load, (unit, _) in CEILING_LOADS.items():
        print(f"  {load}: the front end's CPU a {unit}, and {unit}s a second")
        for name in names:
            windows = figures[(load, name)]
            cpu = [w.cpu_us for w in windows]
            line = (
                f"    {name:12s} {statistics.median(cpu):5.0f} µs ({min(cpu):.0f}-{max(cpu):.0f}) "
                f"at {statistics.median(w.rate for w in windows):7.0f}/s"
            )
            if name != first:
                line += "  " + _against(figures[(load, first)], windows)
            print(line)


def _against(base: list[Window], other: list[Window]) -> str:
    cpu = statistics.median(w.cpu_us for w in other) / statistics.median(w.cpu_us for w in base)
    rate = statistics.median(w.rate for w in other) / statistics.median(w.rate for w in base)
    rounds = [o.cpu_us / b.cpu_us for o, b in zip(other, base, strict=True)]
    return f"{cpu:.2f}x the CPU (round by round {min(rounds):.2f}-{max(rounds):.2f}), {rate:.2f}x the rate"
