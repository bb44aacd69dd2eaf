"""What a new input shape costs an embedding worker's memory: RSS after GELU (as BERT runs it,
through oneDNN) over many shapes, with oneDNN's kernel cache at its default and at the engine's
capacity, with glibc's mmap threshold left dynamic and fixed as the engine fixes it.

Each variant runs in a process of its own (oneDNN reads its capacity once): GELU on a
batch x tokens x 1536 tensor (MiniLM's intermediate width) for batches 1-32 and 3-39 tokens,
1,184 shapes; RSS growth after the first, every 296 shapes. ``--trim`` gives the heap back to
the system before each reading (``malloc_trim``): what the kernels themselves hold.

    .venv/bin/python -m bench.experiments.onednn_shapes
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import subprocess
import sys


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # capacity,fixed: one run, in this process
    parser.add_argument("--trim", action="store_true", help="malloc_trim before each reading")
    args = parser.parse_args()
    if args.variant:
        capacity, fixed = args.variant.split(",")
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
        if fixed == "fixed":
            from workers.engines.embeddings import fix_mmap_threshold

            fix_mmap_threshold()
        print(" ".join(f"{g:.1f}" for g in run_shapes(args.trim)))
        return
    print("| kernel cache | glibc's mmap threshold | RSS growth (MiB) after 296 / 592 / 888 / 1,184 shapes |")
    print("|---|---|---|")
    for capacity in ("1024", "64"):
        for fixed in ("dynamic", "fixed"):
            argv = [sys.executable, "-m", "bench.experiments.onednn_shapes", "--variant", f"{capacity},{fixed}"]
            out = subprocess.run(argv + ["--trim"] * args.trim, capture_output=True, text=True, check=True).stdout
            label = "dynamic (glibc's)" if fixed == "dynamic" else "1 MiB (the engine's)"
            print(f"| {capacity} | {label} | {' / '.join(out.split())} |", flush=True)


if __name__ == "__main__":
    main()
