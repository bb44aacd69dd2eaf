"""The batch tier: does a running batch slow interactive chat, and how fast is a batch on its own?

One tokenwire stack with the real llama.cpp worker (SmolLM2-135M, the front end and one worker,
as :func:`bench.suite.start_engine_stack` starts them). Two measurements, in one run:

1. **Interactive latency**: N clients (1, then 4) in a closed loop streaming chat completions
   of 128 tokens (:func:`bench.concurrency.closed_loop`): TTFT p50/p99 and aggregate tokens/s,
   first alone, then while a batch of ``--batch-requests`` (2,000) chat requests runs. The batch is
   cancelled afterwards. Targets: TTFT p50 at most +10%, tokens/s at least 0.9x.
2. **Batch throughput** on an otherwise idle stack: ``--throughput-requests`` chat requests of
   ``--batch-tokens`` tokens as one batch (upload to the last result), against the same
   requests sent by a client loop (non-streamed, ``--loop-concurrency`` threads, each level in
   turn; the best counts). Target: at least 0.95x the best loop.

Each phase reports the share of the machine's CPU other processes used during it (the machine is
shared). Rerun with:

    .venv/bin/python -m bench.batch_tier [--quick]   # runs itself in bench/.venv, as bench.run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
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


def wait_for(base: str, batch_id: str, done: int | None = None) -> dict[str, Any]:
    """Until the batch has ``done`` results (None: until it ends)."""
    while True:
        state = batch(base, batch_id)
        if state["status"] in ("completed", "failed", "cancelled", "expired"):
            return state
        if done is not None and state["request_counts"]["completed"] >= done:
            return state
        time.sleep(0.2)  # the pace of the polls


def interactive(base: str, clients: int, duration: float) -> dict[str, Any]:
    from bench.suite import NoiseMeter

    with NoiseMeter() as noise:
        result = closed_loop(base, MODEL, clients, duration)
    result = {**result, "other_cpu_share": round(noise.share, 2)}
    log(json.dumps(result))  # each phase as it ends: a long run cut short keeps what it measured
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
    from bench.suite import NoiseMeter, start_engine_stack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter windows, smaller batches (a smoke run)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of each interactive window")
    parser.add_argument("--batch-requests", type=int, default=2000)
    parser.add_argument("--batch-tokens", type=int, default=32, help="tokens of each batch request")
    parser.add_argument("--throughput-requests", type=int, default=96)
    parser.add_argument("--loop-concurrency", default="4,8")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.batch_requests, args.throughput_requests = 10.0, 200, 24
    results: dict[str, Any] = {"args": vars(args), "stream_tokens": STREAM_TOKENS}
    env = {"XDG_DATA_HOME": tempfile.mkdtemp(prefix="bench-batch-")}
    with Group() as group:
        stack = start_engine_stack(group, MODEL, "llama_cpp", prefix="tw", env=env)
        base = stack.base
        for clients in (1, 4):
            log(f"interactive alone, {clients} clients")
            results[f"alone_{clients}"] = interactive(base, clients, args.duration)
        log(f"a batch of {args.batch_requests} requests")
        running = submit(base, args.batch_requests, args.batch_tokens)
        wait_for(base, running, done=1)
        before = batch(base, running)["request_counts"]["completed"]
        started = time.perf_counter()
        for clients in (1, 4):
            log(f"interactive beside the batch, {clients} clients")
            results[f"with_batch_{clients}"] = interactive(base, clients, args.duration)
        beside = batch(base, running)["request_counts"]["completed"] - before
        results["batch_beside_interactive_req_s"] = beside / (time.perf_counter() - started)
        log(f"the batch beside them: {results['batch_beside_interactive_req_s']:.3f} req/s")
        httpx.post(f"{base}/v1/batches/{running}/cancel")
        wait_for(base, running)
        n, tokens = args.throughput_requests, args.batch_tokens
        log(f"batch throughput: {n} requests as a batch")
        with NoiseMeter() as noise:
            start = time.perf_counter()
            final = wait_for(base, submit(base, n, tokens))
            results["batch_req_s"] = n / (time.perf_counter() - start)
        results["batch_other_cpu_share"] = round(noise.share, 2)
        log(f"batch: {results['batch_req_s']:.3f} req/s, other processes {noise.share:.0%} of the CPU")
        assert final["request_counts"]["completed"] == n, final
        for level in (int(c) for c in args.loop_concurrency.split(",")):
            log(f"batch throughput: {n} requests by a client loop of {level}")
            with NoiseMeter() as noise:
                results[f"loop_{level}_req_s"] = client_loop(base, n, tokens, level)
            results[f"loop_{level}_other_cpu_share"] = round(noise.share, 2)
            log(f"loop of {level}: {results[f'loop_{level}_req_s']:.3f} req/s, other processes {noise.share:.0%}")
    report(results)


def report(r: dict[str, Any]) -> None:
    print(json.dumps(r, indent=2))
    print(
        "\n| clients | TTFT p50 alone / with batch (ms) | TTFT p99 alone / with batch (ms) | tok/s alone / with batch | ratio |"
    )
    print("|---|---|---|---|---|")
    for c in (1, 4):
        a, b = r[f"alone_{c}"], r[f"with_batch_{c}"]
        ratio = b["aggregate_tok_s"] / a["aggregate_tok_s"] if a["aggregate_tok_s"] else 0.0
        print(
            f"| {c} | {a['ttft_p50_ms']:.0f} / {b['ttft_p50_ms']:.0f} | {a['ttft_p99_ms']:.0f} / {b['ttft_p99_ms']:.0f}"
            f" | {a['aggregate_tok_s']:.1f} / {b['aggregate_tok_s']:.1f} | {ratio:.2f}x tok/s,"
            f" {b['ttft_p50_ms'] / a['ttft_p50_ms'] if a['ttft_p50_ms'] else 0:.2f}x TTFT p50 |"
        )
    loops = {k: v for k, v in r.items() if k.startswith("loop_") and k.endswith("_req_s")}
    best = max(loops.values()) if loops else 0.0
    print(
        f"\nbatch alone {r['batch_req_s']:.2f} req/s; client loops {loops}; ratio {r['batch_req_s'] / best:.2f}x the best"
    )


if __name__ == "__main__":
    main()
