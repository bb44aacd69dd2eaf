"""bench/.venv: FastChat, the load client and the profilers, beside the project's ``.venv``.

FastChat 0.2.36 needs pydantic 1 and an older FastAPI, so it cannot live in the project's venv.
bench/.venv installs ``deps/bench.lock``, then tokenwire itself, editable and without its
dependencies: the load client imports tokenwire's generated stubs (``tokenwire.v1``) and the
servers its launcher (``common.launcher``, standard library only), and the ``bench`` package is
found from the repository root, as in the project's venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
# The tokenwire servers run on the project's venv.
PROJECT_PYTHON = Path(os.environ.get("TOKENWIRE_PYTHON", ROOT / ".venv" / "bin" / "python"))
BENCH_LOCK = ROOT / "deps" / "bench.lock"


def ensure() -> None:
    """Build bench/.venv, or bring it up to date with the lock."""
    if not PROJECT_PYTHON.exists():
        sys.exit(f"{PROJECT_PYTHON} is missing: run `make install` (or `make bench`) first.")
    stamp = VENV / ".bench-lock"
    # What the venv holds: the lock, and this checkout's tokenwire.
    wanted = BENCH_LOCK.read_text() + f"\n# tokenwire, editable, from {ROOT}\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    print(f"[bench] installing {BENCH_LOCK.relative_to(ROOT)} and tokenwire (editable) into {VENV}", flush=True)
    if not VENV_PYTHON.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet"]
    subprocess.check_call([*pip, "--require-hashes", "-r", str(ROOT / "deps" / "tools.lock")])
    subprocess.check_call([*pip, "--require-hashes", "--no-build-isolation", "-r", str(BENCH_LOCK)])
    subprocess.check_call([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    stamp.write_text(wanted)


def run_inside(module: str, argv: list[str]) -> None:
    """Return if this is bench/.venv's Python; else build it if needed and run ``-m module argv`` there."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    ensure()
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), "-m", module, *argv])
