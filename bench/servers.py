"""Server processes for the benchmark: start, wait until ready, read their CPU and memory.

tokenwire parts run on the project's Python (``.venv``) and print ``READY <part>
<host>:<port>``; FastChat's controller and API server run on the bench venv and are
polled over HTTP until they answer. CPU time comes from ``/proc/<pid>/stat``
(utime + stime, all threads), memory from ``/proc/<pid>/status`` (VmRSS, VmHWM).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.venv import PROJECT_PYTHON, ROOT
from common.launcher import Launched, NotReady  # standard library only: bench/.venv has no tokenwire dependencies

TICKS = os.sysconf("SC_CLK_TCK")
LOG_DIR = Path(tempfile.mkdtemp(prefix="tokenwire-bench-"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 3, utime 14, stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


@dataclass
class Server:
    """One server process; ``name`` is how the report calls it."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    ready_http: str | None = None  # poll this URL instead of reading a READY line
    ready_check: Callable[[bytes], bool] | None = None
    address: str = ""
    log_path: Path = field(init=False)
    launched: Launched | None = None

    def __post_init__(self) -> None:
        self.log_path = LOG_DIR / f"{self.name}.log"

    def start(self, timeout: float = 180.0) -> Server:
        # stderr and stdout (but the READY line) go to the log; a bench killed takes its servers with it.
        self.launched = Launched(
            self.argv,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            stderr=self.log_path,
            on_line=self._log_line,
            with_parent=True,
        ).start()
        try:
            self.launched.wait_ready(
                timeout, until=self._http_ready if self.ready_http is not None else None, poll=0.05
            )
        except NotReady as error:
            if error.reason == "exited":
                raise RuntimeError(f"{self.name} exited with {error.returncode}:\n{self.log()[-4000:]}") from None
            self.stop()
            raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.log()[-4000:]}") from None
        self.address = self.address or self.launched.address
        return self

    def _log_line(self, line: str) -> None:
        if not line.startswith("READY ") and self.launched is not None and self.launched.log_file is not None:
            self.launched.log_file.write(line)

    def _http_ready(self) -> bool:
        assert self.ready_http is not None
        try:
            with urllib.request.urlopen(self.ready_http, timeout=2) as reply:
                body = reply.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
        return self.ready_check(body) if self.ready_check else True

    @property
    def process(self) -> subprocess.Popen[str] | None:
        return self.launched.process if self.launched else None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def part_address(self, part: str, timeout: float = 60.0) -> str:
        """What ``part`` announced (``READY <part> <address>``): a front end holds two parts."""
        assert self.launched is not None
        deadline = time.monotonic() + timeout
        while not self.launched.part_address(part):
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not announce its {part}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        return self.launched.part_address(part)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory_kb(self.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.launched is not None and self.launched.alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self.launched is not None:
            self.launched.stop(timeout)


class Group:
    """Servers started together and stopped in reverse order."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def start(self, server: Server, timeout: float = 180.0) -> Server:
        self.servers.append(server)
        return server.start(timeout)

    def by_name(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)

    def cpu(self) -> dict[str, float]:
        return {s.name: s.cpu() for s in self.servers}

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- tokenwire ------------------------------------------------------------------------


def tokenwire(name: str, *argv: str, env: dict[str, str] | None = None) -> Server:
    return Server(name, [str(PROJECT_PYTHON), "-m", "tokenwire_cli", *argv], env=env or {})


# -- FastChat (bench venv) -------------------------------------------------------------


def fastchat_controller(port: int) -> Server:
    return Server(
        "fastchat-controller",
        [sys.executable, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(port)],
        env={"LOGDIR": str(LOG_DIR)},
        cwd=str(LOG_DIR),
        ready_http=f"http://127.0.0.1:{port}/test_connection",
    )


def fastchat_api_server(port: int, controller_port: int, models: list[str]) -> Server:
    import json

    def listed(body: bytes) -> bool:
        return set(models) <= {m["id"] for m in json.loads(body)["data"]}

    return Server(
        "fastchat-api-server",
        [
            sys.executable,
            "-m",
            "fastchat.serve.openai_api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--controller-address",
            f"http://127.0.0.1:{controller_port}",
        ],
        env={"LOGDIR": str(LOG_DIR)},
        cwd=str(LOG_DIR),
        ready_http=f"http://127.0.0.1:{port}/v1/models",
        ready_check=listed,
    )


def fake_fastchat_worker(name: str, controller_port: int, *argv: str) -> Server:
    return Server(
        name,
        [
            sys.executable,
            "-m",
            "bench.fake_fastchat_worker",
            "--controller-address",
            f"http://127.0.0.1:{controller_port}",
            *argv,
        ],
        cwd=str(ROOT),
    )
