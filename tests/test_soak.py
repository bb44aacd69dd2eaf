"""CI's soak: bench/soak.py for 3 minutes, `make serve` with the real models under its mixed
load. A hand-run hour's figures are in bench/RESULTS.md; three minutes cannot tell a leak
(the RSS line says NOT JUDGED, with its figures), but they do tell a 5xx, a slot or KV cell
left held, a part that crashed and was restarted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.models
@pytest.mark.timeout(900)  # serve's start (the models load), 3 minutes of load, the stop
def test_three_minutes_of_mixed_load_leave_no_5xx_and_nothing_held(tmp_path: Path) -> None:
    argv = ["--minutes", "3", "--warmup-minutes", "1", "--sample-seconds", "15", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), *argv], capture_output=True, text=True, timeout=840
    )
    report = done.stdout
    assert done.returncode == 0, report + done.stderr[-3000:]
    lines = [line.removeprefix("- ") for line in report.splitlines() if line.startswith("- ")]
    assert lines[0].startswith("PASS: 0 x 5xx in "), report
    assert lines[1].startswith("PASS: 0 slots, sequences or KV cells held"), report
    assert lines[2].startswith("NOT JUDGED: RSS growth per hour") and "no part restarted" in lines[2], report
    # Every kind of load ran, and the limits answered as they should.
    for outcome in ("chat 200", "stream 200", "stream cancelled by the client", "embeddings 200", "responses 200",
                    "bad body 400", "bad body 404", "burst 429"):  # fmt: skip
        assert f"| {outcome} |" in report, (outcome, report)
