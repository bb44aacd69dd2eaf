"""Shared systems for the tests: real tokenwire processes on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import harness
from tests.redis_server import RedisServer

API_KEY = "test-key-1"
CHAT_MODEL = "echo-chat"
EMBED_MODEL = "echo-embedding"
ECHO_CONTEXT = 64


@dataclass
class EchoSystem:
    gateway: harness.Proc
    chat_workers: list[harness.Proc]
    embed_worker: harness.Proc
    bridge: harness.Proc

    @property
    def url(self) -> str:
        return f"http://{self.bridge.address}"

    @property
    def grpc_address(self) -> str:
        return self.gateway.address

    def all(self) -> list[harness.Proc]:
        return [self.bridge, *self.chat_workers, self.embed_worker, self.gateway]


def start_echo_system(
    *,
    delay: float = 0.0,
    tokens: int = 16,
    keys: str = API_KEY,
    chat_workers: int = 2,
    context: int = ECHO_CONTEXT,
    gateway_args: tuple[str, ...] = (),
    worker_args: tuple[str, ...] = (),
    bridge_args: tuple[str, ...] = (),
) -> EchoSystem:
    """A gateway (keys from TOKENWIRE_API_KEYS), echo chat workers for one
    model (two by default), one echo embedding worker, and the bridge."""
    gateway = harness.gateway("--heartbeat-expiry", "3", *gateway_args, env={"TOKENWIRE_API_KEYS": keys})
    echo = ["--echo-context-length", str(context), "--echo-tokens", str(tokens), "--echo-delay", str(delay)]
    chat = [harness.echo_worker(gateway.address, CHAT_MODEL, *echo, *worker_args) for _ in range(chat_workers)]
    embed = harness.echo_worker(gateway.address, EMBED_MODEL, "--echo-kind", "embedding")
    bridge = harness.bridge(gateway.address, *bridge_args)
    system = EchoSystem(gateway, chat, embed, bridge)
    harness.wait_for_workers(system.url, CHAT_MODEL, chat_workers, key=API_KEY)
    harness.wait_for_workers(system.url, EMBED_MODEL, 1, key=API_KEY)
    return system


def chat_batch_file(n: int, prefix: str) -> bytes:
    """A batch input file of ``n`` chat requests to the echo model, custom_ids ``{prefix}0``..."""
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "word"}]}
    lines = (
        {"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions", "body": body} for i in range(n)
    )
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def stop_system(system: EchoSystem) -> None:
    for proc in system.all():
        proc.stop()


@pytest.fixture(scope="session")
def echo_system() -> Iterator[EchoSystem]:
    system = start_echo_system()
    yield system
    stop_system(system)


@pytest.fixture(scope="session")
def slow_system() -> Iterator[EchoSystem]:
    """Echo workers that take 20 ms per token, 200 tokens: streams to cancel."""
    system = start_echo_system(delay=0.02, tokens=200)
    yield system
    stop_system(system)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server of the test's own (tests/redis_server.py)."""
    server = RedisServer().start()
    yield server
    server.stop()
