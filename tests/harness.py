"""Real processes on 127.0.0.1 for the tests: ``tokenwire`` parts started as a
user would start them, on port 0, read back from their ``READY`` line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import httpx

from common import addresses
from common.launcher import Launched, NotReady
from tokenwire.v1 import worker_pb2, worker_pb2_grpc

READY_TIMEOUT = 120.0
WAIT_TIMEOUT = 30.0  # wait_until's guard (see there)
# A worker's request line for a cancelled call, and the tokens it made after the cancel.
CANCELLED_CALL = re.compile(r" generate status=cancelled [^\n]* after_cancel=(\d+)")
T = TypeVar("T")


@dataclass
class Proc:
    """One ``tokenwire <part>`` process; stderr (its log) goes to a file."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # What runs it: the `tokenwire` command, or a part's own `python -m <part>`.
    module: str = "tokenwire_cli"
    # A command it runs under (tests/netcluster.py: nsenter into a host's network namespace).
    prefix: list[str] = field(default_factory=list)
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="tokenwire-", suffix=".log")[1]))
    stdout_lines: list[str] = field(default_factory=list)
    launched: Launched | None = None

    def start(self, wait: bool = True) -> Proc:
        self.launched = Launched(
            [*self.prefix, sys.executable, "-m", self.module, *self.argv],
            # Each process its own default --data-dir (a gateway's files and batches).
            env={**os.environ, "XDG_DATA_HOME": tempfile.mkdtemp(prefix="tokenwire-data-"), **self.env},
            stderr=self.log_path,
            on_line=self.stdout_lines.append,
        ).start()
        if wait:
            self.wait_ready()
        return self

    @property
    def process(self) -> subprocess.Popen[str] | None:
        return self.launched.process if self.launched else None

    def _announced(self, marker: str) -> str:
        return self.launched.announced.get(marker, "") if self.launched else ""

    @property
    def address(self) -> str:
        return self._announced("READY")

    def part_address(self, part: str) -> str:
        """Where ``part`` of a process holding two (the front end: gateway, bridge) serves."""
        return self.launched.part_address(part) if self.launched else ""

    @property
    def metrics_address(self) -> str:
        return self._announced("METRICS")

    @property
    def registry_address(self) -> str:
        """A gateway's --registry-port."""
        return self._announced("REGISTRY")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.launched is not None
        try:
            self.launched.wait_ready(timeout)
        except NotReady as error:
            if error.reason == "exited":
                raise RuntimeError(f"tokenwire {self.argv[0]} exited with {error.returncode}:\n{self.log()}") from None
            raise TimeoutError(f"tokenwire {self.argv[0]} not ready:\n{self.log()}") from None

    @property
    def port(self) -> int:
        return addresses.split(self.address)[1]

    def log(self, since: int = 0) -> str:
        """The process's log, or what it wrote after ``since`` (a :meth:`log_mark`)."""
        with self.log_path.open("rb") as handle:
            handle.seek(since)
            return handle.read().decode(errors="replace")

    def log_mark(self) -> int:
        """Where the log ends now: ``log(since=mark)`` is what comes after."""
        return self.log_path.stat().st_size

    def alive(self) -> bool:
        return self.launched is not None and self.launched.alive()

    def signal(self, sig: int) -> None:
        assert self.launched is not None
        self.launched.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.launched.stop(timeout) if self.launched else None

    def kill(self) -> None:
        assert self.launched is not None
        self.launched.kill()


def gateway(*extra: str, env: dict[str, str] | None = None) -> Proc:
    return Proc(["gateway", "--port", "0", *extra], env=env or {}).start()


def worker(controller: str, *extra: str, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
    argv = ["worker", "--port", "0", "--controller-address", controller, "--heartbeat-interval", "0.5", *extra]
    return Proc(argv, env=env or {}).start(wait=wait)


def echo_worker(controller: str, model: str, *extra: str) -> Proc:
    return worker(controller, "--engine", "echo", "--model-name", model, *extra)


def bridge(gateway_address: str, *extra: str, env: dict[str, str] | None = None) -> Proc:
    return Proc(["bridge", "--port", "0", "--gateway-address", gateway_address, *extra], env=env or {}).start()


def front_end(gateway_args: Iterable[str], bridge_args: Iterable[str] = (), env: dict[str, str] | None = None) -> Proc:
    """``tokenwire front-end``: the gateway and the bridge in one process, as serve runs them;
    ready once both are (its bridge at ``part_address("bridge")``)."""
    argv = ["front-end", "--port", "0", *gateway_args, "--bridge", "--port", "0", *bridge_args]
    proc = Proc(argv, env=env or {}).start()
    wait_until(lambda: proc.part_address("bridge") or not proc.alive(), what="the front end's bridge ready")
    if not proc.alive():
        raise RuntimeError(f"tokenwire front-end exited:\n{proc.log()}")
    return proc


def wait_for_models(url: str, models: Iterable[str], key: str | None = None, timeout: float = WAIT_TIMEOUT) -> None:
    """Until the bridge lists every model (the workers registered)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    wanted = set(models)

    def listed() -> bool:
        reply = httpx.get(f"{url}/v1/models", headers=headers, timeout=5)
        return reply.status_code == 200 and wanted <= {m["id"] for m in reply.json()["data"]}

    wait_until(listed, timeout, what=f"models {sorted(wanted)} listed")


def wait_for_workers(url: str, model: str, count: int, key: str | None = None, timeout: float = WAIT_TIMEOUT) -> None:
    """Until the bridge reports ``count`` live workers for ``model``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def live() -> bool:
        reply = httpx.get(f"{url}/v1/models/{model}", headers=headers, timeout=5)
        return reply.status_code == 200 and reply.json().get("workers") == count

    wait_until(live, timeout, what=f"{count} live workers for {model}")


def after_cancel(worker: Proc, since: int, calls: int) -> list[int]:
    """The tokens each of the ``calls`` calls ``worker`` had cancelled since ``since`` (a
    :meth:`Proc.log_mark`) made after its cancel: one figure a call, from the worker's
    request lines (written as a call ends). A test's own figures, where GetStats'
    ``tokens_after_cancel_max`` spans the worker's life, and so every test's calls."""

    def figures() -> list[int] | None:
        found = [int(n) for n in CANCELLED_CALL.findall(worker.log(since))]
        return found if len(found) >= calls else None

    assert calls > 0, "no call was cancelled"
    return wait_until(figures, what=f"{calls} cancelled calls in the worker's log")


def cluster_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """What a member sends: the cluster token (None: an open cluster)."""
    return (("x-tokenwire-cluster-token", token),) if token else ()


def worker_stats(address: str, token: str | None = None) -> worker_pb2.GetStatsResponse:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerServiceStub(channel).GetStats(
            worker_pb2.GetStatsRequest(), timeout=5, metadata=cluster_metadata(token)
        )


def cmdlines() -> dict[int, str]:
    """Every process's command line, as `ps` shows it."""
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return lines


def children(parent: int) -> dict[int, str]:
    """The live child processes of ``parent``, with their command lines."""
    found = {}
    for pid, line in cmdlines().items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z":
            found[pid] = line
    return found


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    samples = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


# -- waiting ----------------------------------------------------------------------
#
# A test waits for what it needs (a state, a counter, a log line, a socket closing),
# never for a time that should be enough, and the one way to wait is wait_until. An
# async test runs it in a thread (``await asyncio.to_thread(harness.wait_until, ...)``),
# which leaves its event loop free to bring the state about. The timeout is no bound
# under test, only a guard that keeps a broken system from hanging the suite, so it is
# generous (WAIT_TIMEOUT): a loaded machine is slow, not wrong. A test whose subject is
# a time (a server's timeout) measures that time, with a margin.


def wait_until(
    predicate: Callable[[], T], timeout: float = WAIT_TIMEOUT, interval: float = 0.05, what: str = "the condition"
) -> T:
    """Poll ``predicate`` until it returns something true, and return that;
    TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not met in {timeout:g} s")
        time.sleep(interval)  # the pace of the polls, not a wait for the state


@dataclass
class Serve:
    """``tokenwire serve`` as a user runs it; its banner tells where to go."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    grpc_address: str = ""
    registry_address: str = ""
    token_file: str = ""
    output: list[str] = field(default_factory=list)
    launched: Launched | None = None
    _banner_done: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout: float = 600.0) -> Serve:
        self.launched = Launched(
            [sys.executable, "-m", "tokenwire_cli", "serve", "--port", "0", "--grpc-port", "0", *self.argv],
            env={**os.environ, **self.env},
            stderr=subprocess.STDOUT,
            on_line=self._read,
        ).start()
        try:
            # serve's own READY is its banner: it prints one when every part is.
            self.launched.wait_ready(timeout, until=self._banner_done.is_set, poll=0.2)
        except NotReady:
            self.stop()
            raise RuntimeError("tokenwire serve did not get ready:\n" + "".join(self.output[-60:])) from None
        return self

    def _read(self, line: str) -> None:
        self.output.append(line)
        if line.strip().startswith("OpenAI REST API"):
            self.url = line.split()[3].removesuffix("/v1")
        elif line.strip().startswith("gRPC gateway"):
            self.grpc_address = line.split()[2]
        elif line.strip().startswith("cluster "):
            # "cluster  registry <host:port>  (token: <file>)"
            self.registry_address = line.split()[2]
            self.token_file = line.split("(token: ", 1)[1].rstrip().removesuffix(")")
        elif "Press Ctrl-C to stop." in line:
            self._banner_done.set()

    @property
    def process(self) -> subprocess.Popen[str] | None:
        return self.launched.process if self.launched else None

    def stop(self, timeout: float = 60.0) -> int | None:
        """Ctrl-C, as a user stops it; SIGKILL to all of it after ``timeout`` seconds."""
        return self.launched.stop(timeout, signal.SIGINT, kill_group=True) if self.launched else None

    @property
    def token(self) -> str:
        """The cluster token serve made, from the file only its user can read."""
        return Path(self.token_file).read_text().strip()

    def log(self) -> str:
        return "".join(self.output)
