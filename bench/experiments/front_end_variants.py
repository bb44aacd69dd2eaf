"""What the front end costs the engine when both share the cores: variants of the stack, side by side.

The concurrency section's load (``bench/concurrency.py``: N clients in a closed loop, chat streams of
128 tokens at temperature 0.7) against several tokenwire stacks and llama-server in one run,
the windows interleaved round by round. Each stack is a front end (gateway and bridge) and a
llama_cpp worker as ``make serve`` runs them; a variant changes one thing:

- ``default``: the stack as shipped, the gateway and the bridge in one process;
- ``split``: the gateway and the bridge as two processes (``serve --split-front-end``; what serve
  ran before 2026-12-02);
- ``interval-2``: the worker with ``--stream-interval 2`` (half the messages through the front end);
- ``event-engine``: every process on grpc's event engine, which the parts turn off by default for
  grpc's classic poller (``common/__init__.py``; a ``GRPC_EXPERIMENTS`` naming them wins);
- ``sched-batch`` / ``sched-idle``: the default stack with its front end under the SCHED_BATCH or
  SCHED_IDLE policy for that window (its wake-ups then do not preempt llama.cpp's threads).

Prints one line per window (tokens/s, TTFT, the front end's CPU per token), then each variant's
ratios to llama-server's window of the same round and level.

``--ceiling`` measures what the front end alone can carry (``bench/front_ends.py``): stacks over
echo workers (an instant one and one making a token a millisecond, as in the REST section of
``make bench``) take the REST section's non-streamed chat at 32 clients and its paced stream at 8,
interleaved round by round; it prints the front end's CPU a request and a streamed token.
``--variants`` picks them among ``default``, ``split`` and ``event-engine`` (``default,split``, the
one-process trade, when not given).

    bench/.venv/bin/python -m bench.experiments.front_end_variants [--levels 1,8] [--rounds 3] [--duration 20]
        [--variants default,split,interval-2,sched-idle]
    bench/.venv/bin/python -m bench.experiments.front_end_variants --ceiling [--rounds 3] [--duration 8]
        [--variants default,event-engine]

It runs in the bench's own venv (its load client; ``bench/run.py`` builds it the first time), and
the servers in the project's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess

from bench import concurrency, front_ends
from bench.front_ends import Stack
from bench.llama_server import ensure_llama_server
from bench.servers import Group, Server
from bench.suite import project_eval

VARIANTS = ("default", "split", "interval-2", "event-engine", "sched-batch", "sched-idle")
CEILING_VARIANTS = ("default", "split", "event-engine")
POLICY = {"sched-batch": "-b", "sched-idle": "-i"}
# What the parts would run on if common/__init__.py did not choose grpc's classic poller.
EVENT_ENGINE = {"GRPC_EXPERIMENTS": "event_engine_client,event_engine_listener,event_engine_for_all_other_endpoints"}
WORKER_ARGS = ("--parallel", "8", "--n-ctx", "8192")


def llama_workers(variant: str) -> dict[str, tuple[str, ...]]:
    """The engine-concurrency stack's one worker: model name -> its ``--engine ...`` arguments."""
    extra = ("--stream-interval", "2") if variant == "interval-2" else ()
    return {"chat": ("llama_cpp", *WORKER_ARGS, *extra)}


def start_variant(group: Group, variant: str, workers: dict[str, tuple[str, ...]]) -> Stack:
    env = EVENT_ENGINE if variant == "event-engine" else None
    return front_ends.start(group, variant, workers, split=variant == "split", env=env)


def set_policy(front: list[Server], flag: str) -> None:
    for server in front:
        subprocess.run(["chrt", "-a", flag, "-p", "0", str(server.pid)], check=True)


async def ceiling(variants: list[str], rounds: int, duration: float) -> None:
    """Each front end's rate and CPU over echo workers, one line a window, then against the first variant's."""
    with Group() as group:
        stacks = {variant: start_variant(group, variant, front_ends.echo_workers()) for variant in variants}
        figures = await front_ends.measure_ceiling(group, stacks, rounds, duration)
    front_ends.print_summary(figures, variants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--variants", help="default,split,interval-2,sched-idle (--ceiling: default,split)")
    parser.add_argument("--ceiling", action="store_true", help="the front end alone over echo workers (see above)")
    args = parser.parse_args()
    known = CEILING_VARIANTS if args.ceiling else VARIANTS
    default = "default,split" if args.ceiling else "default,split,interval-2,sched-idle"
    variants = (args.variants or default).split(",")
    unknown = set(variants) - set(known)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(known)}")
    if args.ceiling:
        asyncio.run(ceiling(variants, args.rounds, args.duration))
        return
    levels = [int(level) for level in args.levels.split(",")]
    gguf = project_eval("from workers.engines.llama_cpp.loading import default_model_path; print(default_model_path())")
    binary = str(ensure_llama_server(log=print))
    with Group() as group:
        stacks: dict[str, Stack] = {}
        for variant in variants:  # the sched-* variants reuse the default stack
            key = "default" if variant in POLICY else variant
            if key not in stacks:
                stacks[key] = start_variant(group, key, llama_workers(key))
        llama = concurrency.start_llama_server(group, binary, gguf, 2, 8, 8192)
        targets: dict[str, tuple[str, str, dict[str, float] | None]] = {
            v: (stacks["default" if v in POLICY else v].base, "chat", None) for v in variants
        }
        targets["llama-server"] = (llama, "smollm2", concurrency.WHOLE_VOCABULARY)
        for base, model, sampling in targets.values():
            concurrency.closed_loop(base, model, 2, 2.0, sampling)
        tok_s: dict[tuple[int, str], list[float]] = {}
        for round_ in range(args.rounds):
            for clients in levels:
                for name, (base, model, sampling) in targets.items():
                    front = stacks["default" if name in POLICY else name].front if name != "llama-server" else []
                    set_policy(front, POLICY.get(name, "-o"))
                    cpu0 = sum(server.cpu() for server in front)
                    run = concurrency.closed_loop(base, model, clients, args.duration, sampling)
                    front_us = (sum(server.cpu() for server in front) - cpu0) * 1e6 / max(1, run["tokens"])
                    set_policy(front, "-o")
                    tok_s.setdefault((clients, name), []).append(run["aggregate_tok_s"])
                    print(
                        f"[{round_ + 1}/{args.rounds}] {clients:2d} streams {name:12s} {run['aggregate_tok_s']:6.1f} tok/s, "
                        f"TTFT p50 {run['ttft_p50_ms']:4.0f} ms, front end {front_us:5.0f} µs of CPU a token",
                        flush=True,
                    )
        print("\nratio to llama-server's window of the same round (median, then each round):")
        for clients in levels:
            anchor = tok_s[(clients, "llama-server")]
            for name in variants:
                ratios = [ours / theirs for ours, theirs in zip(tok_s[(clients, name)], anchor, strict=True)]
                each = ", ".join(f"{r:.2f}" for r in ratios)
                print(f"  {clients:2d} streams {name:12s} {statistics.median(ratios):.2f} ({each})")


if __name__ == "__main__":
    main()
