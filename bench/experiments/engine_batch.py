"""The batching llama_cpp engine alone, in-process: no gRPC, no gateway, no bridge.

The same load as the concurrency section (``bench/concurrency.py``: N clients in a closed
loop, chat streams of 128 tokens at temperature 0.7, a seed per request, the end
tokens banned), driven straight into :class:`workers.engines.llama_cpp.engine.LlamaCppEngine`
on one event loop. Set beside the same load through the worker's gRPC stream and
through the whole stack, it splits the engine's cost from the front end's.

    .venv/bin/python -m bench.experiments.engine_batch --clients 1,4,8,16 --duration 15 [--parallel 8] [--prefill-budget 64]

Prints one JSON line per level: aggregate tokens/s, TTFT p50/p99, steps and tokens per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Generation
from workers.engines.llama_cpp import loading
from workers.engines.llama_cpp.engine import LlamaCppEngine

STREAM_TOKENS = 128
EOG_BAN = {0: -100.0, 2: -100.0, 4: -100.0}
PROMPTS = [
    "Write a story about a dragon who lives in a castle.",
    "Describe a walk on the beach at sunset.",
    "Explain how bread is made, step by step.",
    "Tell me about the moon and the tides.",
]


def request(k: int) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=PROMPTS[k % len(PROMPTS)])],
        sampling=worker_pb2.SamplingParams(temperature=0.7, seed=k, max_tokens=STREAM_TOKENS, logit_bias=EOG_BAN),
    )


async def one(engine: LlamaCppEngine, k: int) -> dict[str, float]:
    req = request(k)
    sent = time.perf_counter()
    prepared = await engine.prepare(req)
    first = 0.0
    tokens = 0
    async for deltas in engine.generate(req, prepared, STREAM_TOKENS, Generation()):
        if not first and any(delta.text for delta in deltas):
            first = time.perf_counter()
        tokens += sum(delta.token_count for delta in deltas)
    end = time.perf_counter()
    return {"ttft_s": first - sent, "tokens": tokens, "decode_tok_s": (tokens - 1) / (end - first) if tokens > 1 else 0}


async def closed_loop(engine: LlamaCppEngine, clients: int, duration: float) -> dict[str, float]:
    records: list[dict[str, float]] = []
    counter = iter(range(1 << 30))
    start = time.perf_counter()
    stop_at = start + duration
    stats = engine.batch_stats()
    steps0, tokens0 = stats.steps, stats.step_tokens_total

    async def client() -> None:
        while time.perf_counter() < stop_at:
            records.append(await one(engine, next(counter)))

    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    ttfts = sorted(r["ttft_s"] for r in records)
    steps = stats.steps - steps0
    return {
        "clients": clients,
        "streams": len(records),
        "aggregate_tok_s": sum(r["tokens"] for r in records) / elapsed,
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "steps_per_s": steps / elapsed,
        "tokens_per_step": (stats.step_tokens_total - tokens0) / steps if steps else 0.0,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--parallel", type=int, default=loading.DEFAULT_PARALLEL)
    parser.add_argument("--prefill-budget", type=int, default=loading.DEFAULT_PREFILL_BUDGET)
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache", choices=("auto", *loading.KV_CACHES), default="auto")
    parser.add_argument("--prefix-cache", type=int, default=0)
    args = parser.parse_args()
    engine = LlamaCppEngine(
        loading.default_model_path(),
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        parallel=args.parallel,
        prefill_budget=args.prefill_budget,
        kv_cache=args.kv_cache,
        prefix_cache=args.prefix_cache,
    )
    await engine.start()
    await closed_loop(engine, 2, 2.0)  # warm up
    for clients in [int(c) for c in args.clients.split(",")]:
        result = await closed_loop(engine, clients, args.duration)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
