"""``tokenwire serve``: the whole system on one machine, as child processes.

Starts the front end (the gateway, with its registry, and the REST bridge, in
one process: ``tokenwire_cli/front_end.py``) and one worker per default model,
each worker a process of its own; waits until the models answer, prints how to
reach them, and stops everything cleanly on Ctrl-C / SIGTERM. With
``--split-front-end`` the gateway and the bridge are two processes, as
before: on a machine with cores to spare that keeps more of the front end's
ceiling for non-streamed requests. What each child runs, its command line and
its environment, is planned in ``tokenwire_cli/plan.py``; this file carries
the plan out. API keys and the cluster token (made here, random, unless one
is given) reach the children through the environment, never their command lines.

A part that crashes is started again after a back-off (1 s, doubling, at most
30 s); a crashed worker is first taken out of the registry, so the gateway
stops routing to it and reports not ready until it is back. Five crashes
within a minute stop everything.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import grpc
import httpx

from common import addresses, cluster
from common.grpc_server import open_sync_channel
from common.launcher import Launched, NotReady
from tokenwire.v1 import registry_pb2, registry_pb2_grpc
from tokenwire_cli.plan import Plan, Ports, Process, plan

READY_TIMEOUT = 600.0
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
CRASH_LIMIT, CRASH_WINDOW = 5, 60.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: Mapping[str, str] | None = None  # None: serve's own
    launched: Launched | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None  # crashed: start again at this time

    @classmethod
    def planned(cls, process: Process) -> Child:
        return cls(process.name, list(process.argv), process.env)

    def start(self) -> None:
        self.started_at = time.monotonic()
        # The same Launched each time: a restarted part keeps its last addresses until it prints new ones.
        argv = [sys.executable, "-m", "tokenwire_cli", *self.argv]
        if self.launched is None:
            self.launched = Launched(argv, env=self.env, on_line=_echo, with_parent=True)
        self.launched.argv = argv
        self.launched.start()

    @property
    def process(self) -> subprocess.Popen[str] | None:
        return self.launched.process if self.launched else None

    @property
    def address(self) -> str:
        return self.launched.address if self.launched else ""

    @property
    def registry_address(self) -> str:
        """The gateway's registry port, from its REGISTRY line."""
        return self.launched.announced.get("REGISTRY", "") if self.launched else ""

    def alive(self) -> bool:
        return self.launched is not None and self.launched.alive()

    def part_address(self, part: str) -> str:
        return self.launched.part_address(part) if self.launched else ""

    def stop(self, timeout: float) -> None:
        if self.alive():
            assert self.launched is not None
            self.launched.stop(timeout)


def _echo(line: str) -> None:
    """A part's output goes to serve's, but for the lines meant for serve itself."""
    if not line.startswith(("READY ", "REGISTRY ")):
        sys.stdout.write(line)


class _Stop:
    """Set by SIGINT/SIGTERM. A plain flag: a signal handler must not take the
    lock that a threading.Event.wait in the same thread may hold."""

    requested = False


def _on_signal(signum: int, frame: object) -> None:
    _Stop.requested = True


def _say(message: str) -> None:
    print(f"[tokenwire] {message}", flush=True)


def _wait_ready(children: list[Child], deadline: float, part: str | None = None) -> None:
    """Until each child printed READY, or READY ``part`` (the bridge of a one-process front end)."""
    for child in children:
        assert child.launched is not None
        until = None if part is None else (lambda child=child: bool(child.part_address(part)))
        try:
            child.launched.wait_ready(
                deadline - time.monotonic(), until=until, stopping=lambda: _Stop.requested, poll=0.2
            )
        except NotReady as error:
            if error.reason == "stopped":
                raise SystemExit("stopped while starting") from None
            if error.reason == "exited":
                raise SystemExit(f"{child.name} exited before it was ready (see its log above)") from None
            raise SystemExit(f"{child.name} was not ready within {READY_TIMEOUT:.0f} s") from None


def _wait_models(url: str, models: list[str], key: str | None, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    while time.monotonic() < deadline and not _Stop.requested:
        try:
            served = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=headers, timeout=2).json()["data"]}
            if set(models) <= served:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit("stopped while starting" if _Stop.requested else f"the models {models} did not register in time")


def _banner(http: str, grpc_address: str, models: tuple[str, ...], keys: bool, registry: str, token_file: str) -> str:
    url = f"http://{http}"
    chat_model = models[0]
    auth = ' -H "Authorization: Bearer $TOKENWIRE_API_KEY"' if keys else ""
    grpc_auth = ' -H "authorization: Bearer $TOKENWIRE_API_KEY"' if keys else ""
    lines = [
        "",
        "tokenwire is ready.",
        f"  OpenAI REST API  {url}/v1   (docs: {url}/docs)",
        f"  gRPC gateway     {grpc_address}  (reflection on; service tokenwire.v1.InferenceService)",
        f"  models           {', '.join(models)}",
        f"  cluster          registry {registry}  (token: {token_file})",
        "",
        "Try it:",
        f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
        f'    -d \'{{"model": "{chat_model}", "messages": [{{"role": "user", "content": "What is the capital of France? Answer in one sentence."}}], "temperature": 0}}\'',
        "",
        "  python -c 'from openai import OpenAI; import os",
        f'  c = OpenAI(base_url="{url}/v1", api_key=os.environ.get("TOKENWIRE_API_KEY", "none"))',
        f'  print(c.chat.completions.create(model="{chat_model}", messages=[{{"role": "user", "content": "Hi!"}}]).choices[0].message.content)\'',
        "",
        f'  grpcurl -plaintext{grpc_auth} -d \'{{"model": "{chat_model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}\' \\',
        f"    {grpc_address} tokenwire.v1.InferenceService/CreateChatCompletion",
        "",
        f"  tokenwire status --controller-address {registry} --cluster-token-file {token_file}",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _forget_worker(registry: str, address: str) -> None:
    """Take a dead worker out of the registry at once, rather than at its heartbeat expiry."""
    try:
        with open_sync_channel(registry) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            metadata = cluster.call_metadata()
            for worker in stub.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=2, metadata=metadata).workers:
                if worker.address == address:
                    stub.Deregister(
                        registry_pb2.DeregisterRequest(worker_id=worker.worker_id), timeout=2, metadata=metadata
                    )
    except grpc.RpcError as error:
        _say(f"could not take the dead worker out of the registry ({error.code().name}); it expires by itself")


class Crashes:
    """The restart policy: back-off per part, and a limit on crashes per minute."""

    def __init__(self) -> None:
        self.times: collections.deque[float] = collections.deque()

    def delay(self, child: Child, now: float) -> float | None:
        """Seconds until ``child`` starts again, or None: too many crashes, give up."""
        self.times.append(now)
        while self.times and self.times[0] <= now - CRASH_WINDOW:
            self.times.popleft()
        if len(self.times) >= CRASH_LIMIT:
            return None
        if now - child.started_at > CRASH_WINDOW:
            child.backoff = BACKOFF_FIRST  # it ran fine for a while: start over
        delay = child.backoff
        child.backoff = min(child.backoff * 2, BACKOFF_MAX)
        return delay


def _supervise(children: list[Child], workers: list[Child], registry: str) -> int:
    """Restart crashed parts until Ctrl-C / SIGTERM (0) or a crash loop (1)."""
    crashes = Crashes()
    while not _Stop.requested:
        time.sleep(0.2)
        now = time.monotonic()
        for child in children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    _say(f"restarting the {child.name}")
                    child.start()
                continue
            if child.alive():
                continue
            assert child.process is not None
            reason = _exit_reason(child.process.returncode)
            delay = crashes.delay(child, now)
            if delay is None:
                _say(
                    f"the {child.name} stopped unexpectedly ({reason}): {CRASH_LIMIT} crashes within "
                    f"{CRASH_WINDOW:.0f} s, so tokenwire is stopping (see the log above)"
                )
                return 1
            _say(f"the {child.name} stopped unexpectedly ({reason}); restarting it in {delay:.0f} s")
            if child in workers and child.address:
                _forget_worker(registry, child.address)
            child.restart_at = now + delay
    return 0


def _port(address: str) -> int:
    return addresses.split(address)[1]


def _pin(planned: Plan, front: Child, bridge: Child | None) -> None:
    """Restart the front end as ``planned``: made with the ports it bound, it comes back on them."""
    front.argv = list(planned.front.argv)
    if bridge is not None and planned.bridge is not None:
        bridge.argv = list(planned.bridge.argv)


def serve(args: argparse.Namespace) -> None:
    from gateway.command import api_keys

    keys = [spec.key for spec in api_keys(args)]
    # The parts prove to each other that they belong together: a random token
    # unless one is given (to join a registry elsewhere). The operator's copy,
    # for `tokenwire status`, is a file only this user can read.
    token = args.cluster_token or secrets.token_urlsafe(32)
    cluster.configure(token)
    private = tempfile.mkdtemp(prefix="tokenwire-")
    token_file = os.path.join(private, "cluster-token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(token + "\n")
    ports = Ports.asked(args)
    planned = plan(args, token, os.environ, ports)
    split = planned.bridge is not None
    # The front end: one process for both parts, or the gateway alone (the bridge follows once it
    # knows the gateway's address); the workers follow once they know the registry's.
    front = Child.planned(planned.front)
    workers: list[Child] = []
    bridge: Child | None = None

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    deadline = time.monotonic() + READY_TIMEOUT
    exit_code = 0
    try:
        grpc_asked, http_asked = addresses.join(args.host, args.grpc_port), addresses.join(args.host, args.port)
        if split:
            _say(f"starting the gateway on {grpc_asked}")
        else:
            _say(f"starting the gateway ({grpc_asked}) and the REST bridge ({http_asked})")
        front.start()
        _wait_ready([front], deadline)  # the gateway's READY comes first
        grpc_address = front.part_address("gateway")
        # The registry: the standalone one given, or the gateway's own port.
        registry_address = args.controller_address or front.registry_address
        ports = replace(ports, grpc=_port(grpc_address))
        if not args.controller_address:
            ports = replace(ports, registry=_port(registry_address))
        planned = plan(args, token, os.environ, ports)
        _pin(planned, front, bridge)
        workers = [Child.planned(worker) for worker in planned.workers]
        _say("starting the workers: loading " + ", ".join(planned.models))
        for worker in workers:
            worker.start()
        if planned.bridge is not None:
            bridge = Child.planned(planned.bridge)
            _say(f"starting the REST bridge on {http_asked}")
            bridge.start()
        http_part = bridge or front
        _wait_ready(workers, deadline)
        _wait_ready([http_part], deadline, part="bridge")
        http = http_part.part_address("bridge")
        ports = replace(ports, http=_port(http))
        planned = plan(args, token, os.environ, ports)
        _pin(planned, front, bridge)
        local_http = addresses.local(args.host, ports.http)
        _wait_models(f"http://{local_http}", list(planned.models), keys[0] if keys else None, deadline)
        print(_banner(http, grpc_address, planned.models, bool(keys), registry_address, token_file), flush=True)
        exit_code = _supervise([front, *workers, *([bridge] if bridge else [])], workers, planned.registry)
    except SystemExit as error:
        _say(str(error))
        exit_code = 0 if _Stop.requested else 1
    finally:
        _say("stopping")
        # Front to back: no new requests, workers leave the registry, then the gateway. The front
        # end in one process drains its bridge, then stops its gateway, before the workers go.
        order = [bridge, *workers, front] if split else [front, *workers]
        for child in order:
            if child is not None:
                child.stop(args.shutdown_grace + 5)
        shutil.rmtree(private, ignore_errors=True)
        _say("stopped")
    sys.exit(exit_code)
