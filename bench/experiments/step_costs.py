"""Where the llama_cpp engine's compute thread spends a step, under the concurrency section's load.

The batching engine in-process (``engine_batch.py``'s closed loop: chat streams of 128
tokens at temperature 0.7, a seed each), with the scheduler's phases timed on the
compute thread: ``llama_decode``, the request's sampler, its output handling (text,
stops, logprobs) and the hand-off to the event loop. Everything but the decode is time
every batched sequence waits for. Right after a decode has streamed the model's weights
through the caches, each of these costs several times what it costs in a warm loop.

    .venv/bin/python -m bench.experiments.step_costs [--clients 1] [--duration 10] [--sampler draw|chain]

``--sampler chain`` gives every request llama.cpp's sampler chain (the same distribution).
Prints one JSON object: µs per step of each phase, and tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.experiments.engine_batch import closed_loop
from workers.engines.llama_cpp import loading, output, sampling, scheduler
from workers.engines.llama_cpp.engine import LlamaCppEngine

spent: Counter[str] = Counter()


def timed(owner: Any, method: str, phase: str) -> None:
    original: Callable[..., Any] = getattr(owner, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - start

    setattr(owner, method, wrapper)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--sampler", choices=("draw", "chain"), default="draw")
    args = parser.parse_args()
    if args.sampler == "chain":
        sampling.make_sampler = sampling.llama_chain  # type: ignore[assignment]
    timed(scheduler.Scheduler, "_step", "step")
    timed(scheduler.Scheduler, "_decode", "decode")
    timed(scheduler.Scheduler, "_flush", "hand-off")
    timed(sampling.VocabularyDraw, "sample_row", "sampler")
    timed(sampling.ChainSampler, "sample_row", "sampler")
    timed(output.Output, "token", "output")
    engine = LlamaCppEngine(loading.default_model_path(), n_ctx=8192, prefix_cache=0)
    await engine.start()
    stats = engine.batch_stats()
    assert stats is not None
    await closed_loop(engine, 2, 2.0)  # warm up
    spent.clear()
    steps0, started = stats.steps, time.perf_counter()
    result = await closed_loop(engine, args.clients, args.duration)
    wall, steps = time.perf_counter() - started, stats.steps - steps0
    await engine.close()
    per_step = {phase: round(1e6 * seconds / steps, 1) for phase, seconds in spent.items()}
    per_step["wall"] = round(1e6 * wall / steps, 1)
    # The scheduler's own work: all of a step that is not one of the phases timed above.
    timed_phases = ("decode", "sampler", "output", "hand-off")
    per_step["scheduler"] = round(per_step["wall"] - sum(per_step.get(phase, 0.0) for phase in timed_phases), 1)
    print(json.dumps({"clients": args.clients, "sampler": args.sampler, "steps": steps,
                      "aggregate_tok_s": round(result["aggregate_tok_s"], 1), "us_per_step": per_step}))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
