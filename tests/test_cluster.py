"""A closed cluster, through real processes: only members holding the
cluster's credentials (a shared token, or a client certificate from the
cluster's CA) register, list or call workers; a user's API key never opens
them; a part refuses to listen beyond loopback without credentials; `serve` is
closed by default, keeps its token out of `ps` and logs, restarts a crashed
part and gives up on a crash loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import harness
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2, registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from tokenwire_cli import supervisor

TOKEN = "cluster-token-for-the-tests-0123456789"
API_KEY = "sk-user-key-for-the-tests-0123456789"
CHAT = "echo-chat"
TOKEN_KEY = "x-tokenwire-cluster-token"
# Every way an outsider (or a user) might knock, without the cluster's token.
ROGUE_CREDENTIALS: dict[str, tuple[tuple[str, str], ...]] = {
    "no credential": (),
    "a user's API key": (("authorization", f"Bearer {API_KEY}"),),
    "a user's API key as the token": ((TOKEN_KEY, API_KEY),),
    "a wrong token": ((TOKEN_KEY, TOKEN[:-1] + "X"),),
}
MEMBER = ((TOKEN_KEY, TOKEN),)


def no_cluster_env() -> dict[str, str]:
    """This process's environment without any tokenwire setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}


def registry_calls(stub: registry_pb2_grpc.RegistryServiceStub, worker_id: str) -> dict[str, Callable[[Any], object]]:
    """Each RegistryService RPC, as a rogue would make it."""
    rogue = registry_pb2.WorkerStatus(
        worker_id=f"{CHAT}@127.0.0.1:9#rogue",
        address="127.0.0.1:9",
        model=common_pb2.ModelInfo(name=CHAT, kind=common_pb2.MODEL_KIND_CHAT, context_length=2048),
        capacity=5,
    )
    return {
        "Register": lambda md: stub.Register(registry_pb2.RegisterRequest(worker=rogue), metadata=md, timeout=5),
        "Heartbeat": lambda md: stub.Heartbeat(
            registry_pb2.HeartbeatRequest(worker_id=worker_id), metadata=md, timeout=5
        ),
        "Deregister": lambda md: stub.Deregister(
            registry_pb2.DeregisterRequest(worker_id=worker_id), metadata=md, timeout=5
        ),
        "ListWorkers": lambda md: stub.ListWorkers(registry_pb2.ListWorkersRequest(), metadata=md, timeout=5),
        "WatchWorkers": lambda md: next(
            iter(stub.WatchWorkers(registry_pb2.WatchWorkersRequest(), metadata=md, timeout=5))
        ),
    }


def worker_calls(stub: worker_pb2_grpc.WorkerServiceStub) -> dict[str, Callable[[Any], object]]:
    """Each WorkerService RPC, straight to the worker, bypassing the gateway."""
    generate = worker_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content="my password")])
    return {
        "Generate": lambda md: next(iter(stub.Generate(generate, metadata=md, timeout=5))),
        "GenerateChoice": lambda md: stub.GenerateChoice(
            worker_pb2.GenerateChoiceRequest(request=generate), metadata=md, timeout=5
        ),
        "GetStats": lambda md: stub.GetStats(worker_pb2.GetStatsRequest(), metadata=md, timeout=5),
        "GetModelInfo": lambda md: stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), metadata=md, timeout=5),
        "CountTokens": lambda md: stub.CountTokens(
            worker_pb2.WorkerServiceCountTokensRequest(messages=generate.messages), metadata=md, timeout=5
        ),
    }


def refused(call: Callable[[Any], object], metadata: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(metadata)
    return caught.value  # type: ignore[return-value]


def listed_ids(stub: registry_pb2_grpc.RegistryServiceStub, metadata: Any = MEMBER) -> set[str]:
    return {w.worker_id for w in stub.ListWorkers(registry_pb2.ListWorkersRequest(), metadata=metadata).workers}


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


# -- a shared token ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, harness.Proc]]:
    """A gateway (registry on its own port) with users' API keys, an echo
    worker holding the token in a file, and the bridge."""
    token_file = tmp_path_factory.mktemp("cluster") / "token"
    token_file.write_text(TOKEN + "\n")
    gateway = harness.gateway(
        "--registry-port", "0", env={"TOKENWIRE_CLUSTER_TOKEN": TOKEN, "TOKENWIRE_API_KEYS": API_KEY}
    )
    worker = harness.echo_worker(gateway.registry_address, CHAT, "--cluster-token-file", str(token_file))
    bridge = harness.bridge(gateway.address)
    harness.wait_for_workers(f"http://{bridge.address}", CHAT, 1, key=API_KEY)
    yield {"gateway": gateway, "worker": worker, "bridge": bridge, "token_file": token_file}  # type: ignore[misc]
    for proc in (bridge, worker, gateway):
        proc.stop()


def test_token_rogue_registry_calls_are_unauthenticated(token_cluster: dict[str, harness.Proc]) -> None:
    with grpc.insecure_channel(token_cluster["gateway"].registry_address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        (real,) = listed_ids(stub)
        for credential, metadata in ROGUE_CREDENTIALS.items():
            for name, call in registry_calls(stub, real).items():
                error = refused(call, metadata)
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, credential)
                # Nothing that helps guessing: not which part was wrong, not the expected form.
                assert error.details() == "Cluster credentials required.", (name, credential)
        # The rogue worker never joined, the real one never left.
        assert listed_ids(stub) == {real}
    client = openai.OpenAI(base_url=f"http://{token_cluster['bridge'].address}/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert reply.choices[0].message.content == "hi"


def test_token_direct_worker_calls_are_unauthenticated(token_cluster: dict[str, harness.Proc]) -> None:
    with grpc.insecure_channel(token_cluster["worker"].address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for credential, metadata in ROGUE_CREDENTIALS.items():
            for name, call in worker_calls(stub).items():
                assert refused(call, metadata).code() == grpc.StatusCode.UNAUTHENTICATED, (name, credential)
        # A member gets in; the rogue calls above never reached the engine.
        assert stub.GetStats(worker_pb2.GetStatsRequest(), metadata=MEMBER, timeout=5).requests_total >= 0
        before = stub.GetStats(worker_pb2.GetStatsRequest(), metadata=MEMBER, timeout=5).requests_total
        for call in worker_calls(stub).values():
            call(MEMBER)
        after = stub.GetStats(worker_pb2.GetStatsRequest(), metadata=MEMBER, timeout=5).requests_total
        assert after == before + 2  # Generate and GenerateChoice


def test_token_public_port_probes_and_status(token_cluster: dict[str, harness.Proc]) -> None:
    gateway, worker = token_cluster["gateway"], token_cluster["worker"]
    # The public port carries the public API only: no registry there.
    with grpc.insecure_channel(gateway.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            registry_pb2_grpc.RegistryServiceStub(channel).ListWorkers(
                registry_pb2.ListWorkersRequest(), metadata=MEMBER, timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    # Health and reflection stay open everywhere, for probes and operators.
    for address in (gateway.registry_address, worker.address):
        with grpc.insecure_channel(address) as channel:
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "grpcurl"), "-plaintext", address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "grpc.health.v1.Health" in listed.stdout
    # `tokenwire status` is a member with the token, and refused without it.
    status = [sys.executable, "-m", "tokenwire_cli", "status", "--controller-address", gateway.registry_address]
    member = subprocess.run(
        [*status, "--cluster-token-file", str(token_cluster["token_file"])],
        capture_output=True, text=True, timeout=60, env=no_cluster_env(),
    )  # fmt: skip
    assert member.returncode == 0, member.stderr
    assert worker.address in member.stdout and "SERVING" in member.stdout
    outsider = subprocess.run(status, capture_output=True, text=True, timeout=60, env=no_cluster_env())
    assert outsider.returncode == 1
    assert "--cluster-token-file" in outsider.stderr
    # The token is in no part's log.
    for proc in (gateway, worker, token_cluster["bridge"]):
        assert TOKEN not in proc.log()


def test_token_standalone_registry() -> None:
    """A standalone registry: the gateway watches it and the worker joins it with the token."""
    env = {"TOKENWIRE_CLUSTER_TOKEN": TOKEN}
    registry = harness.Proc(["registry", "--port", "0"], env=env).start()
    gateway = harness.gateway("--controller-address", registry.address, env=env)
    worker = harness.worker(registry.address, "--engine", "echo", "--model-name", CHAT, env=env)
    bridge = harness.bridge(gateway.address)
    try:
        harness.wait_for_workers(f"http://{bridge.address}", CHAT, 1)
        client = openai.OpenAI(base_url=f"http://{bridge.address}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert reply.choices[0].message.content == "hi"
        with grpc.insecure_channel(registry.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            for name, call in registry_calls(stub, next(iter(listed_ids(stub)))).items():
                assert refused(call, ()).code() == grpc.StatusCode.UNAUTHENTICATED, name
    finally:
        for proc in (bridge, worker, gateway, registry):
            proc.stop()


# -- refusing to listen beyond loopback --------------------------------------------------


def test_non_loopback_bind_without_credentials_refuses_to_start(tmp_path: Path) -> None:
    """0.0.0.0 without credentials: refused before anything binds (so no port is ever open)."""
    short = tmp_path / "short"
    short.write_text("too-short")
    commands = {
        "gateway": ["gateway", "--host", "0.0.0.0", "--port", "0"],
        "registry": ["registry", "--host", "0.0.0.0", "--port", "0"],
        "worker": ["worker", "--host", "0.0.0.0", "--engine", "echo", "--controller-address", "127.0.0.1:9"],
        "short token": ["gateway", "--host", "127.0.0.1", "--port", "0", "--cluster-token-file", str(short)],
    }
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tokenwire_cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=no_cluster_env(),
        )
        for name, argv in commands.items()
    }
    for name, process in runs.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 1, (name, out, err)
        assert "READY" not in out, name
        if name == "short token":
            assert "at least 16 characters" in err
            continue
        assert f"refusing to start: the {name} would listen on 0.0.0.0" in err, err
        for flag in ("--cluster-token-file", "TOKENWIRE_CLUSTER_TOKEN", "--tls-client-ca", "--insecure-cluster"):
            assert flag in err, (name, flag)


# -- mTLS ------------------------------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


def make_cert(folder: Path, ca: tuple[Path, Path], name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (server and client alike) signed by ``ca``."""
    cert, key, csr, ext = (folder / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    ext.write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-days", "1", "-out", str(cert), "-extfile", str(ext))  # fmt: skip
    return str(cert), str(key)


def tls_channel(address: str, ca: Path, cert: tuple[str, str] | None = None) -> grpc.Channel:
    chain, key = (Path(cert[0]).read_bytes(), Path(cert[1]).read_bytes()) if cert else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), private_key=key, certificate_chain=chain)
    return grpc.secure_channel(address, credentials)


def test_mtls_cluster(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "cluster-ca")
    other_ca = make_ca(tmp_path, "other-ca")
    gateway_cert = make_cert(tmp_path, ca, "gateway")
    worker_cert = make_cert(tmp_path, ca, "worker-a")
    member_b = make_cert(tmp_path, ca, "member-b")
    rogue = make_cert(tmp_path, other_ca, "rogue")
    ca_pem = ca[0]

    def mtls(cert: tuple[str, str]) -> tuple[str, ...]:
        return ("--tls-cert", cert[0], "--tls-key", cert[1], "--tls-ca", str(ca_pem), "--tls-client-ca", str(ca_pem))

    gateway = harness.gateway("--registry-port", "0", *mtls(gateway_cert), env={"TOKENWIRE_API_KEYS": API_KEY})
    worker = harness.echo_worker(gateway.registry_address, CHAT, *mtls(worker_cert))
    bridge = harness.bridge(gateway.address, "--tls-ca", str(ca_pem))
    try:
        # The happy path: gateway -> worker and worker -> registry on client certificates.
        harness.wait_for_workers(f"http://{bridge.address}", CHAT, 1, key=API_KEY)
        client = openai.OpenAI(base_url=f"http://{bridge.address}/v1", api_key=API_KEY, max_retries=0)
        reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert reply.choices[0].message.content == "hi"
        # API clients reach the public port with no client certificate; probes too.
        with tls_channel(gateway.address, ca_pem) as channel:
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING

        with tls_channel(gateway.registry_address, ca_pem, member_b) as channel:
            real = listed_ids(registry_pb2_grpc.RegistryServiceStub(channel), ())
        (real_id,) = real
        # Outsiders: a certificate from another CA, or none at all. grpc refuses
        # them in the TLS handshake (grpc-python cannot make a client
        # certificate optional), so no call reaches any method.
        for outsider in (rogue, None):
            for metadata in ((), MEMBER, (("authorization", f"Bearer {API_KEY}"),)):
                with tls_channel(gateway.registry_address, ca_pem, outsider) as channel:
                    for name, call in registry_calls(registry_pb2_grpc.RegistryServiceStub(channel), real_id).items():
                        assert refused(call, metadata).code() == grpc.StatusCode.UNAVAILABLE, (name, outsider)
                with tls_channel(worker.address, ca_pem, outsider) as channel:
                    for name, call in worker_calls(worker_pb2_grpc.WorkerServiceStub(channel)).items():
                        assert refused(call, metadata).code() == grpc.StatusCode.UNAVAILABLE, (name, outsider)

        # Another member (a certificate from the cluster's CA) may list and call,
        # but a worker belongs to the certificate that registered it.
        with tls_channel(gateway.registry_address, ca_pem, member_b) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            calls = registry_calls(stub, real_id)
            for name in ("Heartbeat", "Deregister"):
                assert refused(calls[name], ()).code() == grpc.StatusCode.PERMISSION_DENIED, name
            hijack = stub.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=5).workers[0]
            hijack.address = "127.0.0.1:9"
            with pytest.raises(grpc.RpcError) as caught:
                stub.Register(registry_pb2.RegisterRequest(worker=hijack), timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            (still,) = stub.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=5).workers
            assert still.worker_id == real_id and still.address == worker.address
        with tls_channel(worker.address, ca_pem, member_b) as channel:
            worker_pb2_grpc.WorkerServiceStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=5)

        # `tokenwire status` with a member's certificate.
        status = subprocess.run(
            [sys.executable, "-m", "tokenwire_cli", "status", "--controller-address", gateway.registry_address,
             "--tls-ca", str(ca_pem), "--tls-cert", member_b[0], "--tls-key", member_b[1]],
            capture_output=True, text=True, timeout=60, env=no_cluster_env(),
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert real_id in status.stdout and "SERVING" in status.stdout
        # The worker never lost its registration through all this.
        reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "ok"}], max_tokens=1)
        assert reply.choices[0].message.content == "ok"
    finally:
        for proc in (bridge, worker, gateway):
            proc.stop()


# -- serve: closed by default, restarts crashed parts -----------------------------------


def chat_worker_pid(serve: harness.Serve, not_these: set[int] = frozenset()) -> int | None:  # type: ignore[assignment]
    assert serve.process is not None
    for pid, line in harness.children(serve.process.pid).items():
        if " worker " in line and CHAT in line and pid not in not_these:
            return pid
    return None


def test_serve_is_closed_by_default_and_keeps_its_token_secret() -> None:
    serve = harness.Serve(["--echo", "--log-level", "debug"], env=no_cluster_env()).start(timeout=120)
    try:
        token = serve.token
        assert len(token) >= 32
        assert os.stat(serve.token_file).st_mode & 0o777 == 0o600
        # No secret on any command line: the front end's (gateway and bridge) and two workers'.
        assert serve.process is not None and len(harness.children(serve.process.pid)) == 3
        assert not [line for line in harness.cmdlines().values() if token in line]
        with grpc.insecure_channel(serve.registry_address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            error = refused(lambda md: stub.ListWorkers(registry_pb2.ListWorkersRequest(), metadata=md), ())
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            workers = stub.ListWorkers(registry_pb2.ListWorkersRequest(), metadata=((TOKEN_KEY, token),)).workers
        assert {w.model.name for w in workers} == {"echo-chat", "echo-embedding"}
        for w in workers:
            with grpc.insecure_channel(w.address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                assert refused(worker_calls(stub)["GetStats"], ()).code() == grpc.StatusCode.UNAUTHENTICATED
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="none", max_retries=0)
        assert (
            client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            .choices[0]
            .message.content
            == "hi"
        )
        # The printed status command works as printed.
        command = next(line for line in serve.output if "tokenwire status" in line).split()
        status = subprocess.run(
            [sys.executable, "-m", "tokenwire_cli", *command[1:]], capture_output=True, text=True, timeout=60,
            env=no_cluster_env(),
        )  # fmt: skip
        assert status.returncode == 0 and "echo-embedding" in status.stdout, status.stderr
    finally:
        assert serve.stop() == 0
    assert token not in serve.log()  # nor in any part's log (debug level, all on serve's output)
    assert not os.path.exists(serve.token_file)


def test_serve_restarts_a_chat_worker_killed_mid_stream() -> None:
    # Slow echo tokens (settings reach the workers through the environment).
    env = {**no_cluster_env(), "TOKENWIRE_ECHO_DELAY": "0.05", "TOKENWIRE_ECHO_TOKENS": "400"}
    serve = harness.Serve(["--echo"], env=env).start(timeout=120)
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="none", max_retries=0, timeout=10)
    done = threading.Event()
    embedding_errors: list[str] = []
    embeddings = 0
    readiness: list[tuple[float, int]] = []

    def keep_embedding() -> None:
        nonlocal embeddings
        while not done.is_set():
            try:
                client.embeddings.create(model="echo-embedding", input="still here")
                embeddings += 1
            except openai.APIError as error:
                embedding_errors.append(repr(error))
            # Stamped before it is asked, to order it against the kill.
            readiness.append((time.monotonic(), httpx.get(f"{serve.url}/ready", timeout=5).status_code))
            time.sleep(0.05)  # pacing under test: a client that keeps calling, through the restart

    watcher = threading.Thread(target=keep_embedding, daemon=True)
    watcher.start()
    try:
        pid = chat_worker_pid(serve)
        assert pid is not None
        body = {"model": CHAT, "messages": [{"role": "user", "content": "a long story"}], "stream": True}
        with httpx.stream("POST", f"{serve.url}/v1/chat/completions", json=body, timeout=30) as reply:
            assert reply.status_code == 200
            lines = reply.iter_lines()
            for _ in range(5):
                next(lines)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            rest = [line.removeprefix("data: ") for line in lines if line]
        assert rest[-1] == "[DONE]"
        assert "error" in json.loads(rest[-2])

        def chat_works() -> bool:
            try:
                return (
                    client.chat.completions.create(
                        model=CHAT, messages=[{"role": "user", "content": "back"}], max_tokens=1
                    )
                    .choices[0]
                    .message.content
                    == "back"
                )
            except openai.APIError:
                return False

        harness.wait_until(chat_works, interval=0.2, what="chat through the restarted worker")
        new_pid = chat_worker_pid(serve)
        assert new_pid is not None and new_pid != pid
        # Until the watcher has seen the gateway ready again, once the chat worked.
        back = len(readiness)
        harness.wait_until(lambda: any(status == 200 for _, status in readiness[back:]), what="ready again")
    finally:
        done.set()
        watcher.join(30)
        code = serve.stop()
    log = serve.log()
    assert "the chat worker stopped unexpectedly (killed by SIGKILL); restarting it in 1 s" in log
    assert "restarting the chat worker" in log
    # Embeddings never failed; readiness was false while the chat worker was away, and is back.
    assert embedding_errors == [] and embeddings > 10
    assert any(status == 503 for stamp, status in readiness if stamp > killed)
    assert readiness[-1][1] == 200
    assert code == 0  # Ctrl-C after a restart still stops everything in order
    assert "[tokenwire] stopped" in log


# What serve runs for its front end (command -> how its log names the part), by default and split.
FRONT_ENDS = {(): {"front-end": "front end"}, ("--split-front-end",): {"gateway": "gateway", "bridge": "bridge"}}


@pytest.mark.parametrize("flags", list(FRONT_ENDS), ids=["one-process", "split"])
def test_serve_restarts_its_front_end(flags: tuple[str, ...]) -> None:
    """The gateway and the bridge (one process, or two with --split-front-end) come back on the
    same ports; the workers join the new registry."""
    serve = harness.Serve(["--echo", *flags], env=no_cluster_env()).start(timeout=120)
    assert serve.process is not None
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="none", max_retries=0, timeout=10)

    def chat_works() -> bool:
        try:
            return (
                client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "back"}], max_tokens=1)
                .choices[0]
                .message.content
                == "back"
            )
        except openai.APIError:
            return False

    def front_end_pids(command: str) -> list[int]:
        assert serve.process is not None
        return [p for p, line in harness.children(serve.process.pid).items() if f"tokenwire_cli {command} " in line]

    try:
        parts = FRONT_ENDS[flags]
        assert {command: len(front_end_pids(command)) for command in ("front-end", "gateway", "bridge")} == {
            command: int(command in parts) for command in ("front-end", "gateway", "bridge")
        }
        for command, part in parts.items():
            (pid,) = front_end_pids(command)
            os.kill(pid, signal.SIGKILL)
            restarting = f"the {part} stopped unexpectedly (killed by SIGKILL); restarting it in 1 s"
            harness.wait_until(lambda line=restarting: line in serve.log(), what=restarting)
            harness.wait_until(chat_works, interval=0.2, what=f"chat through the restarted {part}")
            assert grpc_chat_works(serve.grpc_address)  # the gateway's own port, pinned too
    finally:
        assert serve.stop() == 0


def grpc_chat_works(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = api_pb2_grpc.InferenceServiceStub(channel).CreateChatCompletion(
            api_pb2.CreateChatCompletionRequest(
                model=CHAT, messages=[common_pb2.ChatMessage(role="user", content="grpc")], max_tokens=1
            ),
            timeout=10,
        )
    return reply.choices[0].message.content == "grpc"


def test_serve_stops_on_a_crash_loop() -> None:
    serve = harness.Serve(["--echo"], env=no_cluster_env()).start(timeout=120)
    assert serve.process is not None
    others = {pid for pid, line in harness.children(serve.process.pid).items() if CHAT not in line}
    killed: set[int] = set()
    try:
        for _ in range(supervisor.CRASH_LIMIT):
            pid = harness.wait_until(lambda: chat_worker_pid(serve, killed), timeout=60, interval=0.05)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        assert serve.process.wait(timeout=60) == 1
    finally:
        serve.stop()
    log = serve.log()
    assert "restarting it in 1 s" in log and "restarting it in 2 s" in log and "restarting it in 8 s" in log
    assert "the chat worker stopped unexpectedly (killed by SIGKILL): 5 crashes within 60 s" in log
    assert "[tokenwire] stopped" in log
    # Every other part was stopped too.
    assert not (others & set(harness.cmdlines()))


def test_restart_backoff_doubles_to_30_s_and_five_crashes_a_minute_give_up() -> None:
    child = supervisor.Child("chat worker", [])
    crashes = supervisor.Crashes()
    delays = []
    for i in range(8):  # 20 s apart: never five within a minute
        now = 1000.0 + 20 * i
        child.started_at = now - 1  # it crashed a second after it started
        delays.append(crashes.delay(child, now))
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    child.started_at = 1000.0 + 20 * 8 - 61  # up for over a minute: the back-off starts over
    assert crashes.delay(child, 1000.0 + 20 * 8) == 1
    loop, looping = supervisor.Crashes(), supervisor.Child("chat worker", [])
    delays = []
    for i in range(5):  # a second apart
        looping.started_at = 5000.0 + i - 0.5
        delays.append(loop.delay(looping, 5000.0 + i))
    assert delays == [1, 2, 4, 8, None]
