"""The batch tier: does a running batch slow interactive chat, and how fast is a batch on its own?

Tokenwire stacks with the real llama.cpp worker (SmolLM2-135M, the front end and one worker, as
:func:`bench.suite.start_engine_stack` starts them), one per ``--batch-yield`` variant of the
worker (``preempt``, ``reserve``: docs/architecture.md), all started at once and measured in
turn, so that what else runs on the shared machine falls alike on each. Two measurements:

1. **Interactive latency**, ``--rounds`` rounds; in each, for each variant (the order turned
   round every round): N clients (1, then 4) in a closed loop streaming chat completions of 128
   tokens (:func:`bench.concurrency.closed_loop`) for ``--duration`` s: TTFT p50/p99 and aggregate
   tokens/s, alone, then while a batch of ``--batch-requests`` (2,000) chat requests runs on that
   stack (submitted before the two windows, cancelled after them: it need not finish, and a
   batch left running would load the other variant's windows). Targets: TTFT p50 at most +10%,
   tokens/s at least 0.9x, each round's "beside" against the same round's "alone".
2. **Batch throughput** on an otherwise idle stack (the first variant's), ``--throughput-rounds``
   rounds: ``--throughput-requests`` chat requests of ``--batch-tokens`` tokens as one batch
   (from the upload to the poll that sees it completed: polled once a second, as an SDK user would,
   until its last wave runs, then every ``THROUGHPUT_POLL`` s, since the batch's own ``completed_at``
   is in whole seconds and frequent polls all along would take CPU from the worker), and the same requests sent by a client loop
   (non-streamed, ``--loop-concurrency`` threads, each level in turn), the batch first in odd
   rounds and last in even ones, so it always runs next to the largest loop. Target: at least
   0.95x the best loop, read per round too (the loops' rates drift with the machine's load).

Every window logs its figures as it ends, with the load average and the share of the machine's
CPU other processes used during it (the machine is shared). Rerun with:

    .venv/bin/python -m bench.batch_tier [--quick]   # runs itself in bench/.venv, as bench.run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import httpx

from bench import venv
from bench.concurrency import STREAM_TOKENS, closed_loop
from bench.servers import Group

MODEL = "smollm2-135m-instruct"
TOPICS = ["rivers", "bread", "the moon", "trains", "owls", "glass", "tea", "maps"]
VARIANTS = ("preempt", "reserve")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def batch_body(i: int, tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": tokens,
        "temperature": 0.7,
        "seed": i,
        "logit_bias": {"0": -100, "2": -100, "4": -100},  # full length: every request the same work
    }


def submit(base: str, n: int, tokens: int) -> str:
    lines = "".join(
        json.dumps(
            {"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": batch_body(i, tokens)}
        )
        + "\n"
        for i in range(n)
    )
    uploaded = httpx.post(f"{base}/v1/files", files={"file": ("b.jsonl", lines)}, data={"purpose": "batch"}).json()
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return str(httpx.post(f"{base}/v1/batches", json=body).json()["id"])


def batch(base: str, batch_id: str) -> dict[str, Any]:
    return httpx.get(f"{base}/v1/batches/{batch_id}").json()  # type: ignore[no-any-return]


# The throughput part's polls near the batch's end: its end is seen within 20 ms.
THROUGHPUT_POLL = 0.02


def wait_for(base: str, batch_id: str, done: int | None = None, poll: float = 0.2) -> dict[str, Any]:
    """Until the batch has ``done`` results (None: until it ends), polled every ``poll`` s."""
    while True:
        state = batch(base, batch_id)
        if state["status"] in ("completed", "failed", "cancelled", "expired"):
            return state
        if done is not None and state["request_counts"]["completed"] >= done:
            return state
        time.sleep(poll)


class Window:
    """What else ran during a measurement: other processes' share of the CPU, the load average."""

    def __init__(self, group: Group) -> None:
        from bench.suite import NoiseMeter

        self.noise = NoiseMeter(group)

    def __enter__(self) -> Window:
        self.noise.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.noise.__exit__(*exc)
        self.figures = {"other_cpu_share": round(self.noise.share, 2), "load_1m": round(os.getloadavg()[0], 1)}


def save(results: dict[str, Any]) -> None:
    if results["args"]["out"]:
        with open(results["args"]["out"], "w") as f:
            json.dump(results, f, indent=1)


def interactive(group: Group, base: str, clients: int, duration: float, what: str) -> dict[str, Any]:
    with Window(group) as window:
        result = closed_loop(base, MODEL, clients, duration)
    result = {**result, **window.figures}
    # Each window as it ends: a long run cut short keeps what it measured.
    log(f"{what}: " + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))
    return result


def client_loop(base: str, n: int, tokens: int, concurrency: int) -> float:
    """The same requests as the batch, sent by ``concurrency`` threads: requests per second."""
    with httpx.Client(timeout=600) as client:

        def one(i: int) -> None:
            reply = client.post(f"{base}/v1/chat/completions", json=batch_body(i, tokens))
            reply.raise_for_status()

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
        return n / (time.perf_counter() - start)


def main() -> None:
    venv.run_inside("bench.batch_tier", sys.argv[1:])  # the load client's venv, as bench.run
    from bench.suite import start_engine_stack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, short windows, small batches (a smoke run)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="the workers' --batch-yield values to compare")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the interactive windows")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each interactive window")
    parser.add_argument("--batch-requests", type=int, default=2000)
    parser.add_argument("--batch-tokens", type=int, default=32, help="tokens of each batch request")
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument(
        "--throughput-requests", type=int, default=96, help="a multiple of --parallel: no half-empty last wave"
    )
    parser.add_argument("--loop-concurrency", default="1,2,4,8")
    parser.add_argument("--out", default="", help="a JSON file the figures are written to as each window ends")
    parser.add_argument(
        "--n-threads",
        default="1",
        help="the workers' llama.cpp threads (default 1: on the shared 2-core machine, a worker of 2 threads "
        "waits for the second at every step while other engineers' load holds a core; '' for the engine's default)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.throughput_rounds, args.duration = 1, 1, 8.0
        args.batch_requests, args.throughput_requests, args.loop_concurrency = 200, 24, "4,8"
    variants = args.variants.split(",")
    threads = ("--n-threads", args.n_threads, "--n-threads-batch", args.n_threads) if args.n_threads else ()
    levels = [int(c) for c in args.loop_concurrency.split(",")]
    results: dict[str, Any] = {"args": vars(args), "stream_tokens": STREAM_TOKENS, "windows": [], "throughput": []}
    with Group() as group:
        stacks = {
            variant: start_engine_stack(
                group, MODEL, "llama_cpp", "--batch-yield", variant, *threads, prefix=f"tw-{variant}",
                env={"XDG_DATA_HOME": tempfile.mkdtemp(prefix=f"bench-batch-{variant}-")},
            ).base
            for variant in variants
        }  # fmt: skip
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                base = stacks[variant]
                for clients in (1, 4):
                    what = f"round {r + 1} {variant}: {clients} clients alone"
                    figures = interactive(group, base, clients, args.duration, what)
                    results["windows"].append({"round": r, "variant": variant, "batch": False, **figures})
                    save(results)
                running = submit(base, args.batch_requests, args.batch_tokens)
                wait_for(base, running, done=1)
                before, started = batch(base, running)["request_counts"]["completed"], time.perf_counter()
                for clients in (1, 4):
                    what = f"round {r + 1} {variant}: {clients} clients beside the batch"
                    figures = interactive(group, base, clients, args.duration, what)
                    results["windows"].append({"round": r, "variant": variant, "batch": True, **figures})
                    save(results)
                done = batch(base, running)["request_counts"]["completed"] - before
                rate = done / (time.perf_counter() - started)
                results.setdefault("batch_beside_req_s", {}).setdefault(variant, []).append(rate)
                log(f"round {r + 1} {variant}: the batch beside them, {done} requests, {rate:.3f} req/s")
                httpx.post(f"{base}/v1/batches/{running}/cancel")
                wait_for(base, running)
        base, n, tokens = stacks[variants[0]], args.throughput_requests, args.batch_tokens
        client_loop(base, 8, tokens, 8)  # the model's first calls are slower: not in any window
        for r in range(args.throughput_rounds):
            modes: list[int | None] = [None, *sorted(levels, reverse=True)]  # None: the batch
            for level in modes if r % 2 == 0 else modes[::-1]:
                with Window(group) as window:
                    if level is None:
                        start = time.perf_counter()
                        batch_id = submit(base, n, tokens)
                        wait_for(base, batch_id, done=n - max(levels), poll=1.0)  # until its last wave
                        final = wait_for(base, batch_id, poll=THROUGHPUT_POLL)
                        rate = n / (time.perf_counter() - start)
                        assert final["request_counts"]["completed"] == n, final
                    else:
                        rate = client_loop(base, n, tokens, level)
                mode = "batch" if level is None else f"loop {level}"
                results["throughput"].append({"round": r, "mode": mode, "req_s": rate, **window.figures})
                save(results)
                log(f"throughput round {r + 1}: {n} requests, {mode}, {rate:.3f} req/s, {window.figures}")
    report(results, variants)


def report(r: dict[str, Any], variants: list[str]) -> None:
    print(json.dumps(r, indent=2))
    med = statistics.median
    print("\n| variant | clients | TTFT p50 alone / beside (ms) | TTFT p99 alone / beside (ms) | tok/s alone / beside |"
          " TTFT p50 ratio (per round) | tok/s ratio (per round) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        for clients in (1, 4):
            rows = [w for w in r["windows"] if w["variant"] == variant and w["clients"] == clients]
            if not rows:  # --rounds 0: the throughput alone
                continue
            alone = sorted((w for w in rows if not w["batch"]), key=lambda w: w["round"])
            beside = sorted((w for w in rows if w["batch"]), key=lambda w: w["round"])
            ttft = [b["ttft_p50_ms"] / a["ttft_p50_ms"] for a, b in zip(alone, beside, strict=True)]
            tok = [b["aggregate_tok_s"] / a["aggregate_tok_s"] for a, b in zip(alone, beside, strict=True)]

            def both(key: str, fmt: str = ".0f", a: list[Any] = alone, b: list[Any] = beside) -> str:
                return f"{med(w[key] for w in a):{fmt}} / {med(w[key] for w in b):{fmt}}"

            print(
                f"| {variant} | {clients} | {both('ttft_p50_ms')} | {both('ttft_p99_ms')} | {both('aggregate_tok_s', '.1f')}"
                f" | {med(ttft):.2f}x ({', '.join(f'{x:.2f}' for x in ttft)})"
                f" | {med(tok):.2f}x ({', '.join(f'{x:.2f}' for x in tok)}) |"
            )
    modes: dict[str, list[float]] = {}
    for t in r["throughput"]:
        modes.setdefault(t["mode"], []).append(t["req_s"])
    print("\n| mode | req/s (median, rounds) |\n|---|---|")
    for mode, rates in modes.items():
        print(f"| {mode} | {med(rates):.3f} ({', '.join(f'{x:.3f}' for x in rates)}) |")
    loops = {m: med(v) for m, v in modes.items() if m.startswith("loop")}
    if loops and "batch" in modes:
        best = max(loops, key=lambda m: loops[m])
        per_round = [
            next(t["req_s"] for t in r["throughput"] if t["round"] == i and t["mode"] == "batch")
            / max(t["req_s"] for t in r["throughput"] if t["round"] == i and t["mode"].startswith("loop"))
            for i in sorted({t["round"] for t in r["throughput"]})
        ]
        print(
            f"\nbatch / best loop ({best}): {med(modes['batch']) / loops[best]:.2f}x;"
            f" each round against its best loop: {', '.join(f'{x:.2f}' for x in per_round)}"
        )


if __name__ == "__main__":
    main()
