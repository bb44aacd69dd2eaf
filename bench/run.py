"""tokenwire's benchmark: gateway overhead, FastChat side by side, and the engine path.

    make bench                                 # the full run, records bench/RESULTS.md and bench/results.png
    .venv/bin/python bench/run.py --quick      # a short smoke run, writes bench/out/ only
    .venv/bin/python bench/run.py --sections fastchat --merge   # measure one section again, keep the rest
    .venv/bin/python bench/run.py --help       # sections, durations, output

On a quiet machine the full run takes about 7 minutes and --quick about 2 (plus about 20 s
to build bench/.venv the first time); while other processes keep the machine busy it waits
for quiet and measures noisy windows again (up to 2 minutes each), so it can take longer.

It runs on the project's ``.venv`` for the tokenwire servers and builds its own venv,
``bench/.venv``, for everything else: FastChat 0.2.36 (``fschat`` needs pydantic 1 and
an older FastAPI, so it cannot live in the project's venv), the load client (aiohttp,
grpcio), py-spy and matplotlib. It re-executes itself in that venv.

What it measures, on one machine, one scenario at a time (closed loop: N clients, each
sending its next request when the last one is answered):

1. gateway overhead on tokenwire's echo workers: the same load through the REST
   bridge, through the gateway over gRPC, and straight at a worker;
2. FastChat's ``openai_api_server`` + ``controller`` over a zero-cost fake worker
   (``fake_fastchat_worker.py``) with the same REST loads, and the ratios;
3. the engine path: SmolLM2 (llama.cpp) and all-MiniLM-L6-v2 through tokenwire
   against the same libraries in-process (interleaved runs);
4. the floor: what an empty grpc.aio server and client cost per call here
   (``grpc_floor.py``), the part of every hop no application code can remove;
5. engine concurrency: the batching llama_cpp worker beside llama.cpp's own
   ``llama-server`` (built once into ``bench/.cache``) at 1, 4, 8 and 16 streams
   (``concurrency.py``).

Every figure comes with the server CPU it cost, from ``/proc/<pid>/stat`` before and
after the measurement window. Results: ``bench/out/results.json``, a table on stdout,
``RESULTS.md`` and ``results.png`` (in ``bench/out/``, and in ``bench/`` for a full run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
PROJECT_PYTHON = Path(os.environ.get("TOKENWIRE_PYTHON", ROOT / ".venv" / "bin" / "python"))
# bench/.venv installs deps/bench.lock: FastChat 0.2.36 (it needs pydantic 1 and an older
# FastAPI, so it cannot live in the project's venv), the load client, py-spy and matplotlib.
BENCH_LOCK = ROOT / "deps" / "bench.lock"


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
        help="concurrency section: tokenwire, tokenwire-worker, llama-server (default: all three)",
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
    parser.add_argument("--out", type=Path, default=BENCH / "out", help="where results.json, RESULTS.md and the PNG go")
    parser.add_argument(
        "--no-record", action="store_true", help="do not copy RESULTS.md and results.png into bench/ (a full run does)"
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


# -- the bench venv ----------------------------------------------------------------------


def ensure_venv() -> None:
    if not PROJECT_PYTHON.exists():
        sys.exit(f"{PROJECT_PYTHON} is missing: run `make install` (or `make bench`) first.")
    stamp = VENV / ".bench-lock"
    lock = BENCH_LOCK.read_text()
    if stamp.is_file() and stamp.read_text() == lock:
        return
    print(f"[bench] installing {BENCH_LOCK.relative_to(ROOT)} into {VENV}", flush=True)
    if not VENV_PYTHON.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--require-hashes"]
    subprocess.check_call([*pip, "-r", str(ROOT / "deps" / "tools.lock")])
    subprocess.check_call([*pip, "--no-build-isolation", "-r", str(BENCH_LOCK)])
    stamp.write_text(lock)


def in_bench_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)  # --help before any install
    if not in_bench_venv():
        ensure_venv()
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *argv])
    # The load client imports tokenwire's generated stubs, and servers.py common/launcher.py;
    # the bench venv does not install tokenwire (it needs pydantic 1 for FastChat), so it
    # reads them in place.
    sys.path[:0] = [str(ROOT / "generated"), str(ROOT)]
    from suite import run_suite

    started = time.monotonic()
    run_suite(args, started)


if __name__ == "__main__":
    main()
