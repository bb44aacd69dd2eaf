"""py-spy profiles of server processes under load, summarised.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``,
root first). From them: the self share of each function (the leaf frame), the
inclusive share (anywhere on the stack), and the share of each library (the leaf
frame's file, grouped by package). Only Python threads are sampled: gRPC's C-core
threads show up in the CPU figures, not here.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Leaf frames of a thread waiting for work: py-spy --native counts them as samples.
IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    return str(Path(sys.executable).parent / "py-spy")


def record(pid: int, duration: float, out: Path, rate: int = 250, native: bool = False) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` for ``duration`` seconds; wait on the returned process.

    ``native`` adds C/C++/Cython frames (gRPC core, uvloop, libc); py-spy then has to
    pause the process for each sample, so it slows it down: use it for shares, not speed.
    """
    argv = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--full-filenames",
        "--output",
        str(out),
    ]
    argv.append("--native" if native else "--nonblocking")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def library(path: str) -> str:
    """A frame's file as a package name: site-packages/<pkg>/..., stdlib module, or project folder."""
    path = path.replace("\\", "/")
    if "site-packages/" in path:
        rest = path.split("site-packages/", 1)[1]
        return rest.split("/", 1)[0].removesuffix(".py")
    for project in ("rest_bridge", "gateway", "workers", "generated", "tokenwire"):
        if f"/{project}/" in path or path.startswith(f"{project}/"):
            return project
    if "/lib/python3" in path:
        rest = path.split("/lib/python3", 1)[1].split("/", 1)[-1]
        return "stdlib:" + rest.split("/", 1)[0].removesuffix(".py")
    name = path.rsplit("/", 1)[-1] or path
    return name.split(".cpython-", 1)[0]  # cygrpc.cpython-311-x86_64-linux-gnu.so -> cygrpc


def short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"].replace("\\", "/")
    if "site-packages/" in file:
        file = file.split("site-packages/", 1)[1]
    elif "/lib/python3" in file:
        file = file.split("/lib/python3", 1)[1].split("/", 1)[-1]
    else:
        for project in ("rest_bridge/", "gateway/", "workers/", "generated/"):
            if project in file:
                file = project + file.split(project, 1)[1]
                break
    return f"{match['func']} ({file})"


def frame_file(frame: str) -> str:
    match = FRAME.match(frame.strip())
    return match["file"] if match else frame


@dataclass
class Profile:
    samples: int = 0
    idle: int = 0  # samples left out: the thread was waiting (native profiles only)
    self_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    total_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    library_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    # Inclusive shares of the project's own functions (rest_bridge, gateway, workers).
    project_counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def top(self, counter: collections.Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, 100.0 * count / self.samples) for name, count in counter.most_common(n)] if self.samples else []

    def as_dict(self, n: int = 15) -> dict[str, object]:
        return {
            "samples": self.samples,
            "idle_samples": self.idle,
            "self": self.top(self.self_counts, n),
            "inclusive": self.top(self.total_counts, n),
            "libraries": self.top(self.library_counts, n),
            "project_inclusive": self.top(self.project_counts, n),
        }


def parse(path: Path) -> Profile:
    profile = Profile()
    if not path.is_file():
        return profile
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and "(" in f]
        # The first element is the process/thread label py-spy adds.
        if not frames:
            continue
        leaf = frames[-1]
        if leaf.split(" (", 1)[0] in IDLE_LEAVES:
            profile.idle += count
            continue
        profile.samples += count
        profile.self_counts[short(leaf)] += count
        profile.library_counts[library(frame_file(leaf))] += count
        names = {short(f) for f in frames}
        for name in names:
            profile.total_counts[name] += count
            if name.split("(", 1)[-1].startswith(("rest_bridge/", "gateway/", "workers/")):
                profile.project_counts[name] += count
    return profile
