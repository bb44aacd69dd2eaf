"""What a new input shape costs an embedding worker's memory: RSS after GELU (as BERT runs it,
through oneDNN) over many shapes, with oneDNN's kernel cache at its default and at the engine's
capacity, with glibc's mmap threshold left dynamic and fixed at 1 MiB (the engine did so from
04e00a0 until it trimmed the heap when idle instead).

Each variant runs in a process of its own (oneDNN reads its capacity once): GELU on a
batch x tokens x 1536 tensor (MiniLM's intermediate width) for batches 1-32 and 3-39 tokens,
1,184 shapes; RSS growth after the first, every 296 shapes. ``--trim`` gives the heap back to
the system before each reading (``malloc_trim``, as the engine does when idle): what the
kernels themselves hold.

``--pass-cost`` measures the other side: the real engine's embeddings requests back to back (120
requests of 1-8 inputs of 3-40 tokens, one torch thread, through ``embed``), requests a second
and CPU ms a request, with the mmap threshold fixed and with glibc's, each in a process of its
own, alternated for --rounds.

    .venv/bin/python -m bench.experiments.onednn_shapes
    .venv/bin/python -m bench.experiments.onednn_shapes --pass-cost
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import os
import random
import subprocess
import sys
import time

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(size: int = 1 << 20) -> None:
    """Blocks of ``size`` or more are mmapped and unmapped when freed, whatever was freed before."""
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, size)


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def run_shapes(trim: bool) -> list[float]:
    import torch

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    torch.set_num_threads(1)

    def reading() -> float:
        if trim:
            libc.malloc_trim(0)
        return rss_mib()

    torch.nn.functional.gelu(torch.randn(1, 4, 1536))
    start, growth = reading(), []
    for batch in range(1, 33):
        for tokens in range(3, 40):
            torch.nn.functional.gelu(torch.randn(batch, tokens, 1536))
        if batch % 8 == 0:
            growth.append(reading() - start)
    return growth


def pass_cost(fixed: bool) -> tuple[float, float]:
    """Requests a second and CPU ms a request of the embeddings engine, back to back, varied shapes."""
    from tokenwire.v1 import common_pb2
    from workers.engines import embeddings

    if fixed:
        fix_mmap_threshold()
    engine = embeddings.EmbeddingsEngine(embeddings.default_model_path(), torch_threads=1)
    engine._load()
    rng = random.Random(1)
    requests = [
        [
            common_pb2.TextOrTokens(
                tokens=common_pb2.TokenIds(ids=[rng.randint(2000, 20000) for _ in range(rng.randint(3, 40))])
            )
            for _ in range(rng.randint(1, 8))
        ]
        for _ in range(140)
    ]

    async def run(batch: list[list[common_pb2.TextOrTokens]]) -> None:
        for inputs in batch:
            await engine.embed(inputs, None)

    asyncio.run(run(requests[:20]))  # the first kernels, the first pages
    started, cpu = time.monotonic(), time.process_time()
    asyncio.run(run(requests[20:]))
    return 120 / (time.monotonic() - started), (time.process_time() - cpu) / 120 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # capacity,fixed: one run, in this process
    parser.add_argument("--trim", action="store_true", help="malloc_trim before each reading")
    parser.add_argument("--pass-cost", action="store_true", help="CPU a pass, threshold fixed and glibc's")
    parser.add_argument("--rounds", type=int, default=2, help="--pass-cost's rounds (default 2)")
    args = parser.parse_args()
    if args.variant and args.pass_cost:
        per_second, cpu_ms = pass_cost(args.variant == "fixed")
        print(f"{per_second:.1f} req/s, {cpu_ms:.1f} ms")
        return
    if args.pass_cost:
        print("| glibc's mmap threshold | requests/s, CPU ms a request, by round |")
        print("|---|---|")
        costs: dict[str, list[str]] = {"fixed": [], "dynamic": []}
        for _ in range(args.rounds):
            for variant in costs:
                argv = [sys.executable, "-m", "bench.experiments.onednn_shapes", "--pass-cost", "--variant", variant]
                costs[variant].append(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip())
        print(f"| fixed at 1 MiB (the engine until now) | {' / '.join(costs['fixed'])} |")
        print(f"| dynamic (glibc's; the engine trims when idle) | {' / '.join(costs['dynamic'])} |")
        return
    if args.variant:
        capacity, fixed = args.variant.split(",")
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
        if fixed == "fixed":
            fix_mmap_threshold()
        print(" ".join(f"{g:.1f}" for g in run_shapes(args.trim)))
        return
    print("| kernel cache | glibc's mmap threshold | RSS growth (MiB) after 296 / 592 / 888 / 1,184 shapes |")
    print("|---|---|---|")
    for capacity in ("1024", "64"):
        for fixed in ("dynamic", "fixed"):
            argv = [sys.executable, "-m", "bench.experiments.onednn_shapes", "--variant", f"{capacity},{fixed}"]
            out = subprocess.run(argv + ["--trim"] * args.trim, capture_output=True, text=True, check=True).stdout
            label = "dynamic (glibc's)" if fixed == "dynamic" else "fixed at 1 MiB"
            print(f"| {capacity} | {label} | {' / '.join(out.split())} |", flush=True)


if __name__ == "__main__":
    main()
