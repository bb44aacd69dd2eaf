"""Real processes on 127.0.0.1 for the tests: ``tokenwire`` parts started as a
user would start them, on port 0, read back from their ``READY`` line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from tokenwire.v1 import worker_pb2, worker_pb2_grpc

READY_TIMEOUT = 120.0


@dataclass
class Proc:
    """One ``tokenwire <part>`` process; stderr (its log) goes to a file."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # What runs it: the `tokenwire` command, or a part's own `python -m <part>`.
    module: str = "tokenwire_cli"
    process: subprocess.Popen[str] | None = None
    address: str = ""
    metrics_address: str = ""
    registry_address: str = ""  # a gateway's --registry-port
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="tokenwire-", suffix=".log")[1]))
    _ready: threading.Event = field(default_factory=threading.Event)
    stdout_lines: list[str] = field(default_factory=list)

    def start(self, wait: bool = True) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.argv],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_ready()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout_lines.append(line)
            if line.startswith("METRICS "):
                self.metrics_address = line.split()[-1]
            if line.startswith("REGISTRY "):
                self.registry_address = line.split()[-1]
            if line.startswith("READY "):
                self.address = line.split()[-1]
                self._ready.set()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tokenwire {self.argv[0]} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tokenwire {self.argv[0]} not ready:\n{self.log()}")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def gateway(*extra: str, env: dict[str, str] | None = None) -> Proc:
    return Proc(["gateway", "--port", "0", *extra], env=env or {}).start()


def worker(controller: str, *extra: str, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
    argv = ["worker", "--port", "0", "--controller-address", controller, "--heartbeat-interval", "0.5", *extra]
    return Proc(argv, env=env or {}).start(wait=wait)


def echo_worker(controller: str, model: str, *extra: str) -> Proc:
    return worker(controller, "--engine", "echo", "--model-name", model, *extra)


def bridge(gateway_address: str, *extra: str, env: dict[str, str] | None = None) -> Proc:
    return Proc(["bridge", "--port", "0", "--gateway-address", gateway_address, *extra], env=env or {}).start()


def wait_for_models(url: str, models: Iterable[str], key: str | None = None, timeout: float = 30.0) -> None:
    """Until the bridge lists every model (the workers registered)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    wanted = set(models)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = httpx.get(f"{url}/v1/models", headers=headers, timeout=5)
        if reply.status_code == 200 and wanted <= {m["id"] for m in reply.json()["data"]}:
            return
        time.sleep(0.1)
    raise TimeoutError(f"models {wanted} never listed")


def wait_for_workers(url: str, model: str, count: int, key: str | None = None, timeout: float = 30.0) -> None:
    """Until the bridge reports ``count`` live workers for ``model``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def live() -> bool:
        reply = httpx.get(f"{url}/v1/models/{model}", headers=headers, timeout=5)
        return reply.status_code == 200 and reply.json().get("workers") == count

    wait_until(live, timeout)


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


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


@dataclass
class Serve:
    """``tokenwire serve`` as a user runs it; its banner tells where to go."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # What runs it: the `tokenwire` command, or a part's own `python -m <part>`.
    module: str = "tokenwire_cli"
    process: subprocess.Popen[str] | None = None
    url: str = ""
    grpc_address: str = ""
    registry_address: str = ""
    token_file: str = ""
    output: list[str] = field(default_factory=list)

    def start(self, timeout: float = 600.0) -> Serve:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tokenwire_cli", "serve", "--port", "0", "--grpc-port", "0", *self.argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        ready = threading.Event()

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
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
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("tokenwire serve did not get ready:\n" + "".join(self.output[-60:]))
        return self

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    @property
    def token(self) -> str:
        """The cluster token serve made, from the file only its user can read."""
        return Path(self.token_file).read_text().strip()

    def log(self) -> str:
        return "".join(self.output)
