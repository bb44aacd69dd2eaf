"""Raw decode steps with and without glibc's transparent huge pages, interleaved.

``decode_steps.py`` in the worker's KV layout (per-sequence streams, 8 of 8192 cells, as
``make serve`` runs), each round once with 4 KB pages and once with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (what the llama_cpp worker restarts itself
with where the kernel gives huge pages on request). Prints the median ms a step of each.

    .venv/bin/python -m bench.experiments.huge_pages [--rounds 8] [--sequences 1]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

from bench.venv import ROOT

HUGE = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def step_ms(sequences: int, env: dict[str, str]) -> float:
    argv = [sys.executable, "-m", "bench.experiments.decode_steps", "--sequences", str(sequences), "--per-sequence-kv",
            "--streams", "8", "--n-ctx", str(8 * 8192)]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(argv, env={**base, **env}, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = re.search(r"([\d.]+) ms a step", out)
    if not found:
        raise RuntimeError(f"decode_steps.py printed no step time: {out!r}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=1)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"4 KB pages": [], "huge pages": []}
    for _ in range(args.rounds):
        runs["4 KB pages"].append(step_ms(args.sequences, {}))
        runs["huge pages"].append(step_ms(args.sequences, HUGE))
    for name, values in runs.items():
        print(f"{args.sequences} sequence(s), {name}: median {statistics.median(values):.2f} ms a step "
              f"({', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip
    faster = 1 - statistics.median(runs["huge pages"]) / statistics.median(runs["4 KB pages"])
    print(f"huge pages: {100 * faster:.1f}% less time a step")


if __name__ == "__main__":
    main()
