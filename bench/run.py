"""tokenwire's benchmark (``make bench``): gateway overhead, FastChat side by side, and the engine path.

    make bench                                  # the full run: records bench/RESULTS.generated.md and results.png
    .venv/bin/python -m bench.run --quick       # a short smoke run, writes bench/out/ only
    .venv/bin/python -m bench.run --sections fastchat --merge   # measure one section again, keep the rest
    .venv/bin/python -m bench.run --help        # sections, durations, output

Run from the repository root. The tokenwire servers run on the project's ``.venv``; everything
else runs in the bench's own venv, ``bench/.venv`` (``venv.py``: FastChat 0.2.36, the load client,
py-spy and matplotlib), which this builds the first time (a minute or two) and re-executes itself in.

The sections, in the order they run (``--sections`` picks them). The loads are closed loops:
N clients, each sending its next request when the last one is answered.

- ``overhead``: tokenwire's gateway and bridge (two processes, to measure each) over echo
  workers. Non-streamed chat at 1 and 32 clients, streamed chat at 8 (from an instant engine, and
  from one making a token a millisecond: the paced stream) and embeddings at 8, each through the
  REST bridge, through the gateway over gRPC, and straight at a worker; then the paced stream
  through the bridge from a worker run with ``--stream-interval 4``; then every process's memory.
- ``profile`` (only with ``overhead``, on its stack after its loads): py-spy on the bridge and
  the gateway under three of the REST loads (``profiling.py``).
- ``fastchat``: FastChat's ``openai_api_server`` + ``controller`` over a zero-cost fake worker
  (``fake_fastchat_worker.py``) under the same REST loads.
- ``engines``: SmolLM2 (llama.cpp) and all-MiniLM-L6-v2 through tokenwire against the same
  libraries in-process (``engine_raw.py``), in interleaved runs.
- ``floor``: what an empty grpc.aio server and client cost per call here (``grpc_floor.py``), the
  part of every hop no application code can remove.
- ``concurrency``: the batching llama_cpp worker beside llama.cpp's own ``llama-server`` (built
  once into ``bench/.cache``: ``llama_server.py``) at 1, 4, 8 and 16 streams (1 and 4 with
  ``--quick``; ``concurrency.py``).

Every figure comes with the server CPU it cost, from ``/proc/<pid>/stat`` before and after the
measurement window. While other processes keep the machine busy, a section waits for quiet and
measures noisy windows again (up to 2 minutes each), so a run can take much longer than on a
quiet machine.

Output: ``results.json``, ``RESULTS.generated.md`` (the report), ``results.png`` and the profiles
in ``bench/out/``, and a table on stdout. A full run (neither ``--quick`` nor ``--no-record``)
copies the report and the chart into ``bench/``, as the latest recorded run. The analyses stay in
``bench/RESULTS.md``, which no run writes.

Not run here: ``bench/before_after.py`` (the front end's CPU before and after a change) and the
one-off experiments of ``bench/experiments/`` (its README says what each measured).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import venv


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="short windows, one run per engine figure; bench/out/ only"
    )
    parser.add_argument("--warmup", type=float, default=None, help="seconds of load before each window (2; quick 0.5)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement window (8; quick 2)")
    parser.add_argument(
        "--sections",
        default="overhead,fastchat,profile,engines,floor,concurrency",
        help="comma-separated: overhead, fastchat, profile, engines, floor, concurrency (default: all)",
    )
    parser.add_argument(
        "--parallel", type=int, default=8, help="concurrency section: parallel sequences of both servers (8)"
    )
    parser.add_argument(
        "--concurrency-levels", default="", help="concurrency section: client counts, e.g. 1,8 (1,4,8,16)"
    )
    parser.add_argument(
        "--concurrency-targets",
        default="",
        help="concurrency section: tokenwire, tokenwire-worker, llama-server, llama-server-own (default: all four)",
    )
    parser.add_argument("--concurrency-rounds", type=int, default=1, help="concurrency section: interleaved rounds (1)")
    parser.add_argument(
        "--concurrency-quiet-wait",
        type=float,
        default=30.0,
        help="concurrency section: seconds to wait for quiet before each window (30)",
    )
    parser.add_argument(
        "--worker-args", default="", help="concurrency section: extra flags for tokenwire's llama_cpp worker"
    )
    parser.add_argument(
        "--engine-runs", type=int, default=None, help="interleaved rounds of generations per engine figure (5; quick 1)"
    )
    parser.add_argument(
        "--out", type=Path, default=venv.BENCH / "out", help="where results.json, the report and the PNG go"
    )
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="do not copy RESULTS.generated.md and results.png into bench/ (a full run does)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="start from the results.json already in --out and replace only what this run measures "
        "(to measure one section again, e.g. after a noisy neighbour)",
    )
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    args.duration = args.duration if args.duration is not None else (2.0 if args.quick else 8.0)
    args.engine_runs = args.engine_runs or (1 if args.quick else 5)
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)  # --help before any install
    venv.run_inside("bench.run", argv)
    # Only in bench/.venv: the load client needs its packages.
    from bench.suite import run_suite

    started = time.monotonic()
    run_suite(args, started)


if __name__ == "__main__":
    main()
