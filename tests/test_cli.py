"""The command line as a user runs it: serve, environment settings, shutdown,
a standalone registry that restarts."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai

from tests import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_echo_with_keys_from_env() -> None:
    """`tokenwire serve` starts everything, prints how to use it, and stops on Ctrl-C."""
    env = {**os.environ, "TOKENWIRE_API_KEYS": "k1,k2", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        # With keys, '*' origins bring no warning.
        [
            sys.executable,
            "-m",
            "tokenwire_cli",
            "serve",
            "--echo",
            "--port",
            "0",
            "--grpc-port",
            "0",
            *["--allowed-origins", "*"],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    output = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        for line in process.stdout:
            output.append(line)
            if "Press Ctrl-C to stop." in line or time.monotonic() > deadline:
                break
        text = "".join(output)
        url = re.search(r"OpenAI REST API\s+(http://\S+/v1)", text).group(1)  # type: ignore[union-attr]
        assert "grpcurl -plaintext" in text and "curl " in text
        assert "CORS allows all origins" not in text
        client = openai.OpenAI(base_url=url, api_key="k2", max_retries=0)
        reply = client.chat.completions.create(
            model="echo-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert reply.choices[0].message.content == "hi"
        try:
            openai.OpenAI(base_url=url, api_key="k3", max_retries=0).models.list()
            raise AssertionError("a key outside TOKENWIRE_API_KEYS was accepted")
        except openai.AuthenticationError:
            pass
        # Ctrl-C, twice in a row as impatient people (and make) do.
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, text + rest
        assert "[tokenwire] stopped" in rest
        assert "Traceback" not in text + rest
        # Nothing is left behind: the bridge's port is closed.
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if process.poll() is None:
            process.kill()


def test_startup_errors_name_the_problem() -> None:
    """`tokenwire front-end` without the bridge's part, or with two CAs to dial with; a CA file
    that is not there: a line saying so, no traceback."""
    for argv, message in (
        (["front-end", "--port", "0"], "usage: tokenwire front-end <gateway flags> --bridge <bridge flags>"),
        (["front-end", "--port", "0", "--bridge", "--tls-ca", "/nonexistent-ca.pem"], "the same --tls-ca"),
        (["bridge", "--port", "0", "--tls-ca", "/nonexistent-ca.pem"], "--tls-ca /nonexistent-ca.pem: No such file"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "tokenwire_cli", *argv], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_sigterm_exits_zero() -> None:
    gateway = harness.gateway()
    worker = harness.echo_worker(gateway.address, "echo-chat")
    bridge = harness.bridge(gateway.address)
    assert [bridge.stop(), worker.stop(), gateway.stop()] == [0, 0, 0]
    assert "Traceback" not in bridge.log()


def test_standalone_registry_restart_workers_come_back() -> None:
    """Workers register again when the registry forgets them; the gateway keeps
    serving from its view meanwhile."""
    port = free_port()
    registry = harness.Proc(["registry", "--port", str(port), "--heartbeat-expiry", "3"]).start()
    gateway = harness.gateway("--controller-address", registry.address)
    worker = harness.echo_worker(registry.address, "echo-chat")
    bridge = harness.bridge(gateway.address)
    url = f"http://{bridge.address}"
    try:
        harness.wait_for_workers(url, "echo-chat", 1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        registry.stop()
        # The registry is gone: requests are still served from the gateway's view.
        reply = client.chat.completions.create(
            model="echo-chat", messages=[{"role": "user", "content": "a"}], max_tokens=1
        )
        assert reply.choices[0].message.content == "a"
        registry = harness.Proc(["registry", "--port", str(port), "--heartbeat-expiry", "3"]).start()
        # The restarted registry knows nothing; the worker's next heartbeat brings it back.
        harness.wait_until(
            lambda: worker.log().count(" registered echo-chat@") >= 2, what="the worker registered again"
        )
        harness.wait_for_workers(url, "echo-chat", 1)
        reply = client.chat.completions.create(
            model="echo-chat", messages=[{"role": "user", "content": "b"}], max_tokens=1
        )
        assert reply.choices[0].message.content == "b"
    finally:
        for proc in (bridge, worker, gateway, registry):
            proc.stop()


def test_each_part_runs_on_its_own() -> None:
    """`python -m gateway`, `python -m workers` and `python -m rest_bridge`, with their own flags."""
    gateway = harness.Proc(["--port", "0"], module="gateway").start()
    worker = harness.Proc(
        ["--port", "0", "--controller-address", gateway.address, "--engine", "echo", "--model-name", "solo"],
        module="workers",
    ).start()
    bridge = harness.Proc(["--port", "0", "--gateway-address", gateway.address], module="rest_bridge").start()
    try:
        url = f"http://{bridge.address}"
        harness.wait_for_workers(url, "solo", 1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "a b c"}])
        assert reply.choices[0].message.content
    finally:
        for proc in (bridge, worker, gateway):
            proc.stop()


def test_serve_warns_of_every_origin_without_keys() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    serve = harness.Serve(["--echo", "--no-embeddings", "--allowed-origins", '["*"]'], env=env).start(timeout=120)
    try:
        assert "warning: no API key is set and CORS allows all origins" in serve.log()
        reply = httpx.get(f"{serve.url}/v1/models", headers={"Origin": "http://evil.example"})
        assert reply.headers["access-control-allow-origin"] == "*"  # as it was told
    finally:
        assert serve.stop() == 0
