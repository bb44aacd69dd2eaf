"""Hosts on one machine, for the network tests (tests/test_network.py).

Each host is a network namespace with an address of its own (10.200.0.N/24 on its
``eth0``), joined by a veth pair to one bridge: the switch, in a namespace of its own too,
so that nothing is added to the machine's own network and concurrent runs never meet.
iproute2 builds them. Faults:

- ``Network.cut(a, b)``: a partition between two hosts, and ``Network.blackhole(host)``:
  every packet to and from a host; both dropped at the switch by nftables (``drop``: no
  reset, no ICMP, silence, as behind a failed switch);
- ``Network.lose(a, b, percent)``: random loss between two hosts (nftables ``numgen random``);
- ``Host.block_port(port)``: one server silenced on its host, for everyone (its neighbours
  on the same host too);
- latency and jitter: ``tests/delay_relay.py``, a delaying TCP relay (this kernel has no
  ``netem`` qdisc);
- processes: SIGSTOP, SIGKILL, restarts, through ``harness.Proc``;
- a host's clock: libfaketime in its processes (``Host.clock_offset``); a namespace cannot
  do it: Linux's time namespaces shift CLOCK_MONOTONIC and CLOCK_BOOTTIME only, never the
  wall clock.

Teardown: a namespace lives as long as a process in it. Every process started here (each
namespace's holder, the tokenwire parts, the relays) gets SIGKILL when the thread that
started it (the test's) dies (PR_SET_PDEATHSIG, through ``setpriv``), and
``Network.close`` kills them all in any case, so no namespace, veth or bridge outlives the
test that made it, whether it passed, failed, or was interrupted or killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests import harness

SUBNET = "10.200.0"
CLONE_NEWNET = 0x40000000
FAKETIME_LIBRARY = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
TOOLS = ("ip", "nft", "unshare", "nsenter", "setpriv")
# Every process of a test's network dies with the test (see the module's docstring).
DIE_WITH_TEST = ["setpriv", "--pdeathsig", "KILL", "--"]


@functools.cache
def unavailable() -> str | None:
    """Why the network tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces, veth pairs and nftables need root (make test runs as root in CI)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: `make nettools` installs Debian's iproute2, nftables and libfaketime"
    if not os.path.exists(FAKETIME_LIBRARY):
        return f"missing {FAKETIME_LIBRARY}: `make nettools` installs Debian's libfaketime"
    # What the kernel must allow: a namespace, a veth pair, a bridge, nftables on it.
    probe = "ip link add p0 type veth peer name p1 && ip link add s0 type bridge && nft add table bridge probe"
    done = subprocess.run(["unshare", "--net", "sh", "-c", probe], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return f"this kernel refuses a namespace, a veth pair, a bridge or nftables on it: {done.stderr.strip()}"
    return None


def _run(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


class Namespace:
    """A network namespace, held open by a process that sleeps in it."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            [*DIE_WITH_TEST, "unshare", "--net", "--", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        path = Path(f"/proc/{self.holder.pid}/ns/net")
        # unshare has made the namespace once the holder's is not ours.
        harness.wait_until(
            lambda: path.exists() and os.readlink(path) != os.readlink("/proc/self/ns/net"),
            what="a new network namespace",
        )
        self.inode = os.stat(path).st_ino
        self.path = str(path)

    @property
    def enter(self) -> list[str]:
        """A command prefix that runs the command in this namespace."""
        return ["nsenter", f"--net={self.path}", "--"]

    def run(self, *argv: str, stdin: str | None = None) -> str:
        return _run([*self.enter, *argv], stdin)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@dataclass
class Host:
    """One host: a namespace and its address; the processes started on it."""

    name: str
    address: str
    namespace: Namespace
    network: Network
    env: dict[str, str] = field(default_factory=dict)  # for every process started here (its clock)
    procs: list[harness.Proc] = field(default_factory=list)

    def proc(
        self, argv: list[str], *, module: str = "tokenwire_cli", env: dict[str, str] | None = None
    ) -> harness.Proc:
        """A process on this host (not started)."""
        proc = harness.Proc(
            argv, env={**self.env, **(env or {})}, module=module, prefix=[*self.namespace.enter, *DIE_WITH_TEST]
        )
        self.procs.append(proc)
        return proc

    def run(self, *argv: str, stdin: str | None = None) -> str:
        return self.namespace.run(*argv, stdin=stdin)

    def block_port(self, port: int) -> None:
        """Silence a server on this host: packets to its port and from it dropped, for everyone."""
        self._host_rules([f"tcp dport {port} drop"], [f"tcp sport {port} drop"])

    def unblock(self) -> None:
        self._host_rules([], [])

    def _host_rules(self, incoming: list[str], outgoing: list[str]) -> None:
        self.run(
            "nft",
            "-f",
            "-",
            stdin=(
                "table inet tokenwire\nflush table inet tokenwire\ntable inet tokenwire {\n"
                "  chain input { type filter hook input priority 0; policy accept;\n"
                + "".join(f"    {rule}\n" for rule in incoming)
                + "  }\n  chain output { type filter hook output priority 0; policy accept;\n"
                + "".join(f"    {rule}\n" for rule in outgoing)
                + "  }\n}\n"
            ),
        )

    def clock_offset(self, seconds: float) -> None:
        """This host's wall clock ``seconds`` off, for the processes started from now on."""
        self.env.update(
            LD_PRELOAD=FAKETIME_LIBRARY,
            FAKETIME=f"{seconds:+g}",
            FAKETIME_DONT_FAKE_MONOTONIC="1",  # the wall clock only, as a skewed host's is
            FAKETIME_DONT_RESET="1",  # children (none here) would keep the offset
        )

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread on this host: the sockets it opens (httpx, the OpenAI SDK) are the host's,
        and so are those of the threads it starts. Not for gRPC: grpc's own threads stay out."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(self.namespace.path, os.O_RDONLY)
        try:
            if libc.setns(there, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.name}")
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(own)
            os.close(there)


class Network:
    """A switch and the hosts on it; ``close()`` (or ``with``) takes all of it down."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.relays: list[harness.Proc] = []
        self._rules: list[str] = []
        self.switch = Namespace()
        try:
            self.switch.run("ip", "link", "add", "br0", "type", "bridge")
            self.switch.run("ip", "link", "set", "br0", "up")
            self._apply()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def host(self, name: str) -> Host:
        """A new host on the switch, with the next address."""
        namespace = Namespace()
        address = f"{SUBNET}.{len(self.hosts) + 1}"
        host = Host(name, address, namespace, self)
        self.hosts[name] = host
        port = f"p{len(self.hosts)}"
        self.switch.run(
            "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", str(namespace.holder.pid)
        )
        self.switch.run("ip", "link", "set", port, "master", "br0", "up")
        host.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")
        host.run("ip", "link", "set", "lo", "up")
        return host

    # -- faults at the switch ------------------------------------------------------

    def cut(self, a: Host, b: Host) -> None:
        """A partition between ``a`` and ``b``: their packets to each other vanish."""
        self._rules += [
            f"ip saddr {a.address} ip daddr {b.address} counter drop",
            f"ip saddr {b.address} ip daddr {a.address} counter drop",
        ]
        self._apply()

    def blackhole(self, host: Host) -> None:
        """Every packet to and from ``host`` vanishes (ARP still answers: silence, not an error)."""
        self._rules += [f"ip saddr {host.address} counter drop", f"ip daddr {host.address} counter drop"]
        self._apply()

    def lose(self, a: Host, b: Host, percent: float) -> None:
        """``percent`` of the packets between ``a`` and ``b`` (each way) lost at random."""
        per_mille = round(percent * 10)
        for src, dst in ((a, b), (b, a)):
            self._rules.append(
                f"ip saddr {src.address} ip daddr {dst.address} numgen random mod 1000 < {per_mille} counter drop"
            )
        self._apply()

    def heal(self) -> None:
        """Every switch fault removed."""
        self._rules.clear()
        self._apply()

    def _apply(self) -> None:
        rules = "".join(f"    {rule}\n" for rule in self._rules)
        self.switch.run(
            "nft",
            "-f",
            "-",
            stdin=(
                "table bridge tokenwire\nflush table bridge tokenwire\ntable bridge tokenwire {\n"
                "  chain forward { type filter hook forward priority 0; policy accept;\n" + rules + "  }\n}\n"
            ),
        )

    def dropped(self) -> int:
        """Packets the switch's faults have dropped so far."""
        listing = self.switch.run("nft", "list", "table", "bridge", "tokenwire")
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))

    # -- latency -----------------------------------------------------------------

    def relay(
        self, host: Host, listen_port: int, to: str, delay_ms: float, jitter_ms: float, on: bool = True
    ) -> harness.Proc:
        """A delaying TCP relay on ``host`` (tests/delay_relay.py), listening on its address."""
        argv = [
            "--listen",
            f"{host.address}:{listen_port}",
            "--to",
            to,
            "--delay-ms",
            str(delay_ms),
            "--jitter-ms",
            str(jitter_ms),
        ]
        proc = host.proc([*argv, *([] if on else ["--off"])], module="tests.delay_relay").start()
        self.relays.append(proc)
        return proc

    # -- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Every process on every host killed, then every namespace: veths and the bridge go with them."""
        for host in self.hosts.values():
            for proc in host.procs:
                if proc.launched is not None and proc.alive():
                    with contextlib.suppress(ProcessLookupError):
                        proc.signal(signal.SIGCONT)  # a stopped process dies of SIGKILL too, but reap it now
                    proc.kill()
                if proc.launched is not None:
                    proc.stop(0)  # closes its log file
        for namespace in [*(host.namespace for host in self.hosts.values()), self.switch]:
            namespace.close()

    def inodes(self) -> set[int]:
        return {host.namespace.inode for host in self.hosts.values()} | {self.switch.inode}


def live_namespaces(inodes: set[int]) -> set[int]:
    """Which of these network namespaces some process still holds."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                inode = os.stat(entry / "ns" / "net").st_ino
                if inode in inodes:
                    found.add(inode)
    return found


# -- the cluster ---------------------------------------------------------------------

API_KEY = "sk-network-test"
CHAT = "echo-chat"
REGISTRY_PORT, GATEWAY_PORT, BRIDGE_PORT, WORKER_PORT, RELAY_PORT, METRICS_PORT = 21001, 50051, 8000, 7000, 7100, 9100


def _openssl(*args: str) -> None:
    _run(["openssl", *args])


def make_certificates(folder: Path, hosts: list[Host]) -> dict[str, tuple[str, str]]:
    """A cluster CA (``ca.pem``) and a certificate per host for its address, server and client alike."""
    ca_cert, ca_key = folder / "ca.pem", folder / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-keyout", str(ca_key), "-out", str(ca_cert), "-subj", "/CN=tokenwire-network-test-ca")  # fmt: skip
    certs = {}
    for host in hosts:
        cert, key, csr, ext = (folder / f"{host.name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
        ext.write_text(f"basicConstraints=CA:FALSE\nsubjectAltName=IP:{host.address},IP:127.0.0.1\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host.name}")  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-days", "2", "-out", str(cert), "-extfile", str(ext))  # fmt: skip
        certs[host.name] = (str(cert), str(key))
    return certs


@dataclass
class Cluster:
    """A standalone registry, a gateway and a REST bridge on one host (``front``), echo chat
    workers on hosts of their own, and a client host, over a closed cluster: a cluster token
    (or mTLS with ``tls``) on real, non-loopback addresses."""

    network: Network
    front: Host
    worker_hosts: list[Host]
    client: Host
    folder: Path
    tls: bool = False
    worker_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    registry_args: tuple[str, ...] = ()
    # (delay, jitter) in ms: the gateway reaches each worker through a relay on its host that delays
    # each way by that much once it is switched on (SIGUSR1; it starts without)
    relayed: tuple[float, float] | None = None
    started_workers: int = 0  # how many workers start with the cluster (the other hosts are spare)
    registry: harness.Proc | None = None
    gateway: harness.Proc | None = None
    bridge: harness.Proc | None = None
    workers: list[harness.Proc] = field(default_factory=list)
    certs: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.front.address}:{BRIDGE_PORT}"

    @property
    def registry_address(self) -> str:
        return f"{self.front.address}:{REGISTRY_PORT}"

    @property
    def gateway_address(self) -> str:
        return f"{self.front.address}:{GATEWAY_PORT}"

    def credentials(self, host: Host, dials: bool = True) -> list[str]:
        """A serving member's cluster credentials: the token, or its certificate (mTLS), with the CA
        it checks its clients' against, and the one it dials other members with (``dials``)."""
        if not self.tls:
            return ["--cluster-token-file", str(self.folder / "cluster-token")]
        cert, key = self.certs[host.name]
        ca = str(self.folder / "ca.pem")
        return ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca, *(["--tls-ca", ca] if dials else [])]

    def registry_proc(self) -> harness.Proc:
        argv = ["registry", "--host", self.front.address, "--port", str(REGISTRY_PORT)]
        return self.front.proc([*argv, *self.credentials(self.front, dials=False), *self.registry_args])

    def gateway_proc(self) -> harness.Proc:
        argv = [
            "gateway",
            "--host",
            self.front.address,
            "--port",
            str(GATEWAY_PORT),
            "--controller-address",
            self.registry_address,
        ]
        # With mTLS its public port is TLS without client certificates (API clients have none);
        # it dials the workers with its certificate.
        tls = self.credentials(self.front)
        return self.front.proc([*argv, *tls, *self.gateway_args], env={"TOKENWIRE_API_KEYS": API_KEY})

    def bridge_proc(self) -> harness.Proc:
        argv = [
            "bridge",
            "--host",
            self.front.address,
            "--port",
            str(BRIDGE_PORT),
            "--gateway-address",
            self.gateway_address,
        ]
        return self.front.proc([*argv, *(["--tls-ca", str(self.folder / "ca.pem")] if self.tls else [])])

    def worker_proc(self, index: int) -> harness.Proc:
        host = self.worker_hosts[index]
        argv = ["worker", "--engine", "echo", "--model-name", CHAT, "--host", host.address, "--port", str(WORKER_PORT),
                "--controller-address", self.registry_address, "--heartbeat-interval", "1",
                "--metrics-port", str(METRICS_PORT), "--echo-tokens", "100000", "--echo-delay", "0.05"]  # fmt: skip
        if self.relayed:
            argv += ["--worker-address", f"{host.address}:{RELAY_PORT}"]
        return host.proc([*argv, *self.credentials(host), *self.worker_args])

    def start(self) -> Cluster:
        (self.folder / "cluster-token").write_text(secrets.token_urlsafe(24))
        if self.tls:
            self.certs = make_certificates(self.folder, [self.front, *self.worker_hosts])
        if self.relayed:
            for host in self.worker_hosts:
                self.network.relay(host, RELAY_PORT, f"{host.address}:{WORKER_PORT}", *self.relayed, on=False)
        self.registry = self.registry_proc().start(wait=False)
        self.gateway = self.gateway_proc().start(wait=False)
        self.bridge = self.bridge_proc().start(wait=False)
        self.workers = [self.worker_proc(i).start(wait=False) for i in range(self.started_workers)]
        for proc in (self.registry, self.gateway, self.bridge, *self.workers):
            proc.wait_ready()
        self.wait_for_workers(len(self.workers))
        return self

    # -- the client's view -----------------------------------------------------------

    def get(self, path: str) -> httpx.Response:
        with self.client.entered():
            return httpx.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)

    def live_workers(self) -> int:
        """How many live workers the gateway dispatches to (-1: the bridge does not answer)."""
        try:
            reply = self.get(f"/v1/models/{CHAT}")
        except httpx.HTTPError:
            return -1
        return int(reply.json().get("workers", 0)) if reply.status_code == 200 else 0

    def wait_for_workers(self, count: int, timeout: float = harness.WAIT_TIMEOUT) -> None:
        harness.wait_until(lambda: self.live_workers() == count, timeout, interval=0.1, what=f"{count} live workers")

    def chat(self, content: str, max_tokens: int = 3, timeout: float = 30) -> httpx.Response:
        with self.client.entered():
            return httpx.post(
                f"{self.url}/v1/chat/completions",
                json={"model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=timeout,
            )

    def stream(self, content: str, max_tokens: int) -> Stream:
        """A streamed chat, read in a thread on the client host."""
        stream = Stream(self.url, content, max_tokens)
        with self.client.entered():
            stream.thread.start()  # the thread starts on the client host
        return stream

    def worker_metric(self, index: int, name: str) -> float:
        """The sum of a worker's samples of metric ``name`` (its /metrics, read from the client host)."""
        with self.client.entered():
            page = httpx.get(f"http://{self.worker_hosts[index].address}:{METRICS_PORT}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(name + "{"))

    def in_flight(self, index: int) -> int:
        return int(self.worker_metric(index, "tokenwire_engine_in_flight"))

    def busy_worker(self) -> int:
        """The one worker with a call running (waited for)."""
        return (
            harness.wait_until(
                lambda: next((i + 1 for i in range(len(self.workers)) if self.in_flight(i)), None), what="a busy worker"
            )
            - 1
        )

    def status(self) -> str:
        """``tokenwire status`` as an operator on the front host runs it."""
        argv = [sys.executable, "-m", "tokenwire_cli", "status", "--controller-address", self.registry_address]
        if self.tls:
            cert, key = self.certs[self.front.name]
            argv += ["--tls-ca", str(self.folder / "ca.pem"), "--tls-cert", cert, "--tls-key", key]
        else:
            argv += ["--cluster-token-file", str(self.folder / "cluster-token")]
        return self.front.run(*argv)

    def registered(self, index: int) -> int:
        """How many times the registry has logged worker ``index`` registering."""
        return self.registry.log().count(f"@{self.worker_hosts[index].address}:") if self.registry else 0


class Stream:
    """One SSE chat stream: each event's text with the time (monotonic) it arrived."""

    def __init__(self, url: str, content: str, max_tokens: int) -> None:
        self.url = url
        self.body = {
            "model": CHAT,
            "stream": True,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        }
        self.started = 0.0
        self.status = 0
        self.events: list[tuple[float, str]] = []
        self.failure: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        try:
            self.started = time.monotonic()
            with httpx.stream(
                "POST",
                f"{self.url}/v1/chat/completions",
                json=self.body,
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=httpx.Timeout(10, read=120),
            ) as reply:
                self.status = reply.status_code
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line.removeprefix("data: ")))
        except BaseException as error:
            self.failure = error
        finally:
            self.done.set()

    def wait(self, timeout: float = harness.WAIT_TIMEOUT) -> Stream:
        if not self.done.wait(timeout):
            raise TimeoutError(f"the stream did not end in {timeout:g} s")
        return self

    def tokens(self) -> int:
        """Content chunks so far."""
        return sum(1 for _, data in self.events if '"content":"' in data and '"content":""' not in data)


@contextlib.contextmanager
def cluster(
    workers: int = 3,
    *,
    spare: int = 0,
    tls: bool = False,
    relayed: tuple[float, float] | None = None,
    worker_args: tuple[str, ...] = (),
    gateway_args: tuple[str, ...] = (),
    registry_args: tuple[str, ...] = (),
    clock_offsets: tuple[float, ...] = (),
) -> Iterator[Cluster]:
    """A whole cluster on a network of its own, taken down when the block ends, however it ends:
    ``workers`` started, ``spare`` more hosts for workers started later, worker host ``i``'s
    clock ``clock_offsets[i]`` seconds off."""
    with Network() as network, tempfile.TemporaryDirectory(prefix="tokenwire-net-") as folder:
        front = network.host("front")
        worker_hosts = [network.host(f"worker{i + 1}") for i in range(workers + spare)]
        client = network.host("client")
        for host, offset in zip(worker_hosts, clock_offsets, strict=False):
            host.clock_offset(offset)
        yield Cluster(
            network,
            front,
            worker_hosts,
            client,
            Path(folder),
            tls=tls,
            worker_args=worker_args,
            gateway_args=gateway_args,
            registry_args=registry_args,
            relayed=relayed,
            started_workers=workers,
        ).start()


if __name__ == "__main__":  # a cluster to try by hand: python -m tests.netcluster
    with cluster() as c:
        print(f"bridge {c.url} (client host {c.client.namespace.path}); Ctrl-C to take it down", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
