"""Two front ends behind one client that alternates between them, sharing a real Redis.

A standalone registry, echo workers registered there, and two ``tokenwire front-end``
processes over both (``--controller-address``) with ``--store redis://...``: per-key limits
exact across the two, Responses chains across them and across their restarts, a key revoked
in one replica's file refused by both, and Redis killed and restarted under them.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests import harness
from tests.conftest import CHAT_MODEL
from tests.redis_server import RedisServer

KEYS = "plain-key\nlimited-key rpm=10\ntokens-key tpm=100\ndoomed-key\n"


@dataclass
class Fleet:
    redis: RedisServer
    registry: harness.Proc
    worker: harness.Proc
    keys_files: list[Path]
    front_ends: list[harness.Proc] = field(default_factory=list)

    def start_front_ends(self) -> None:
        self.front_ends = [
            harness.front_end(
                [
                    "--controller-address",
                    self.registry.address,
                    "--api-keys-file",
                    str(keys_file),
                    *("--store", self.redis.url, "--store-timeout-ms", "2000"),
                ],
                ["--store", self.redis.url, "--store-timeout-ms", "2000"],
            )
            for keys_file in self.keys_files
        ]
        for url in self.urls:
            harness.wait_for_workers(url, CHAT_MODEL, 1, key="plain-key")

    def stop_front_ends(self) -> None:
        for front in self.front_ends:
            assert front.stop() == 0, front.log()

    @property
    def urls(self) -> list[str]:
        return [f"http://{front.part_address('bridge')}" for front in self.front_ends]

    def clients(self, key: str) -> Iterator[tuple[int, openai.OpenAI]]:
        """(replica, client): the replicas in turn, as a round-robin load balancer sends them."""
        clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20) for url in self.urls]
        return itertools.cycle(enumerate(clients))


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    # Each replica has its own keys file (as on two machines), the same keys in both.
    keys_files = [tmp_path / "keys-a.txt", tmp_path / "keys-b.txt"]
    for keys_file in keys_files:
        keys_file.write_text(KEYS)
    registry = harness.Proc(["registry", "--port", "0", "--heartbeat-expiry", "3"]).start()
    worker = harness.echo_worker(registry.address, CHAT_MODEL, "--echo-tokens", "8")
    fleet = Fleet(redis_server, registry, worker, keys_files)
    try:
        fleet.start_front_ends()
        yield fleet
    finally:
        for proc in (*fleet.front_ends, worker, registry):
            proc.stop()


def chat(client: openai.OpenAI, **extra: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "one two three"}], **extra
    )


def test_rpm_is_exact_across_replicas(fleet: Fleet) -> None:
    outcomes = []
    for replica, client in itertools.islice(fleet.clients("limited-key"), 12):
        try:
            chat(client, max_tokens=1)
            outcomes.append((replica, "ok"))
        except openai.RateLimitError as error:
            retry_after = int(error.response.headers["retry-after"])
            assert 1 <= retry_after <= 60
            outcomes.append((replica, "429"))
    # 10 in the window across both; the 11th and the 12th refused, one by each replica.
    assert [result for _, result in outcomes] == ["ok"] * 10 + ["429"] * 2
    assert {replica for replica, result in outcomes if result == "429"} == {0, 1}
    # Another key is not affected.
    for _, client in itertools.islice(fleet.clients("plain-key"), 4):
        chat(client, max_tokens=1)


def test_tpm_counts_streamed_tokens_across_replicas(fleet: Fleet) -> None:
    used: list[int] = []
    refused: list[int] = []
    for replica, client in itertools.islice(fleet.clients("tokens-key"), 12):
        try:
            stream = chat(client, stream=True, stream_options={"include_usage": True})
            usage = [chunk.usage for chunk in stream if chunk.usage]
            used.append(usage[0].total_tokens)
        except openai.RateLimitError as error:
            assert "tokens per minute" in error.message and int(error.response.headers["retry-after"]) >= 1
            refused.append(replica)
    # Admitted while the tokens counted so far (on both replicas) were under 100, then refused by both.
    assert sum(used[:-1]) < 100 <= sum(used), used
    assert len(used) + len(refused) == 12 and set(refused) == {0, 1}


def _turn(client: openai.OpenAI, text: str, previous: str | None) -> openai.types.responses.Response:
    extra = {"previous_response_id": previous} if previous else {}
    return client.responses.create(model=CHAT_MODEL, input=text, **extra)  # type: ignore[arg-type]


def test_responses_chain_across_replicas_and_their_restarts(fleet: Fleet) -> None:
    previous = None
    inputs = []
    for turn, (_, client) in enumerate(itertools.islice(fleet.clients("plain-key"), 10)):
        response = _turn(client, f"turn {turn}", previous)
        assert response.status == "completed" and response.store is True
        assert response.usage is not None
        inputs.append(response.usage.input_tokens)
        previous = response.id
    # Each turn carried the whole conversation, whichever replica stored the turn before.
    assert inputs == sorted(inputs) and len(set(inputs)) == 10
    first = fleet.clients("plain-key")
    _, client_a = next(first)
    _, client_b = next(first)
    assert client_b.responses.retrieve(previous).id == previous
    items = client_a.responses.input_items.list(previous)
    assert [item.content[0].text for item in items.data] == ["turn 9"]  # type: ignore[union-attr]
    # Another key sees none of it.
    stranger = openai.OpenAI(base_url=f"{fleet.urls[0]}/v1", api_key="limited-key", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(previous)

    fleet.stop_front_ends()
    fleet.start_front_ends()
    for turn, (_, client) in enumerate(itertools.islice(fleet.clients("plain-key"), 2), start=10):
        response = _turn(client, f"turn {turn}", previous)
        assert response.usage is not None and response.usage.input_tokens > inputs[-1]
        inputs.append(response.usage.input_tokens)
        previous = response.id
    _, client = next(fleet.clients("plain-key"))
    deleted = client.responses.delete(previous)
    assert deleted is None or getattr(deleted, "deleted", True)
    _, other = list(itertools.islice(fleet.clients("plain-key"), 2))[1]
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(previous)


def test_a_key_revoked_in_one_replicas_file_is_refused_by_both(fleet: Fleet) -> None:
    for _, client in itertools.islice(fleet.clients("doomed-key"), 2):
        chat(client, max_tokens=1)
    started = time.monotonic()
    fleet.keys_files[0].write_text(KEYS.replace("doomed-key\n", ""))  # only replica 0's file

    def refused_by(url: str) -> bool:
        reply = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer doomed-key"}, timeout=5)
        return reply.status_code == 401

    harness.wait_until(lambda: all(refused_by(url) for url in fleet.urls), what="doomed-key refused by both")
    assert time.monotonic() - started < 5
    for _, client in itertools.islice(fleet.clients("doomed-key"), 2):
        with pytest.raises(openai.AuthenticationError):
            chat(client, max_tokens=1)
    for _, client in itertools.islice(fleet.clients("plain-key"), 2):
        chat(client, max_tokens=1)  # the others still work
    # Back in the file: it works again everywhere.
    fleet.keys_files[0].write_text(KEYS)
    harness.wait_until(lambda: not any(refused_by(url) for url in fleet.urls), what="doomed-key accepted again")


def test_redis_killed_then_restarted_under_both_replicas(fleet: Fleet) -> None:
    clients = fleet.clients("plain-key")
    _, client = next(clients)
    before = _turn(client, "stored before", None)
    # This outage's lines: a command past its deadline on a loaded machine may have made an earlier one.
    marks = [front.log_mark() for front in fleet.front_ends]
    fleet.redis.kill()

    # Chat goes on, limited keys too (--limits-when-store-down local, the default).
    for _, client in itertools.islice(fleet.clients("limited-key"), 4):
        chat(client, max_tokens=1)
    # A lookup is 503 store_unavailable, from either replica, at once.
    for replica, client in itertools.islice(fleet.clients("plain-key"), 2):
        with pytest.raises(openai.APIStatusError) as caught:
            client.responses.retrieve(before.id)
        assert caught.value.status_code == 503, replica
        assert caught.value.body["code"] == "store_unavailable"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as caught:
            _turn(client, "and then?", before.id)
        assert caught.value.status_code == 503
    # A new response is served, and says it was not stored; streamed too.
    for _, client in itertools.islice(fleet.clients("plain-key"), 2):
        unstored = _turn(client, "not kept", None)
        assert unstored.status == "completed" and unstored.store is False
    with client.responses.stream(model=CHAT_MODEL, input="not kept either") as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.store is False
    # The outage is on every bridge's and gateway's metrics, and in the log once.
    for front, mark in zip(fleet.front_ends, marks, strict=True):
        bridge_metrics = harness.scrape(f"http://{front.part_address('bridge')}/metrics")
        assert bridge_metrics["tokenwire_store_up"] == 0
        outage = front.log(since=mark)
        assert outage.count("down (bridge)") == 1 and outage.count("down (gateway)") == 1

    fleet.redis.start()

    def stored_again() -> bool:
        try:
            return _turn(client, "kept again", None).store is True
        except openai.APIStatusError:
            return False

    harness.wait_until(stored_again, what="responses stored again after Redis came back")
    # Each part's probe finds it back on its own (every 0.5 s): the gateways' too, before their limits are read.
    harness.wait_until(
        lambda: all(
            "up again (gateway)" in front.log(since=mark) for front, mark in zip(fleet.front_ends, marks, strict=True)
        ),
        what="the gateways' store up again",
    )
    # What Redis had kept (its append-only file) is there again, from either replica.
    for _, client in itertools.islice(fleet.clients("plain-key"), 2):
        assert _turn(client, "and then?", before.id).status == "completed"
    # And the limits are shared again: the window starts over in the store.
    outcomes = []
    for _, client in itertools.islice(fleet.clients("limited-key"), 12):
        try:
            chat(client, max_tokens=1)
            outcomes.append("ok")
        except openai.RateLimitError:
            outcomes.append("429")
    assert outcomes.count("ok") <= 10 and outcomes[-2:] == ["429", "429"]
    for front in fleet.front_ends:
        assert "up again (bridge)" in front.log()
        assert harness.scrape(f"http://{front.part_address('bridge')}/metrics")["tokenwire_store_up"] == 1
        assert front.alive()


def test_serve_takes_the_store_to_its_front_end(redis_server: RedisServer, tmp_path: Path) -> None:
    """`make serve ARGS="--store redis://..."`: the password from a file, limits and Responses in Redis."""
    redis_server.restart_with_password("serve-store-secret")
    password = tmp_path / "store-password"
    password.write_text("serve-store-secret\n")
    keys = tmp_path / "keys.txt"
    keys.write_text("serve-key rpm=5\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    argv = ["--echo", "--no-embeddings", "--store", redis_server.url, "--store-password-file", str(password)]
    serve = harness.Serve([*argv, "--api-keys-file", str(keys)], env=env).start(timeout=120)
    try:
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="serve-key", max_retries=0)
        stored = _turn(client, "kept in redis", None)
        assert stored.store is True
        with pytest.raises(openai.RateLimitError):  # serve's own readiness probe used one too
            for _ in range(5):
                chat(client, max_tokens=1)
        names = redis_server.keys("serve-store-secret")
        assert f"tokenwire:responses:item:{stored.id}" in names
        [requests] = [name for name in names if name.startswith("tokenwire:limits:") and name.endswith(":requests")]
        assert redis_server.command("serve-store-secret", "ZCARD", requests) == "5"  # the window, in Redis
        tokenwire = [line for line in harness.cmdlines().values() if "tokenwire_cli" in line]
        assert len(tokenwire) >= 3 and not [line for line in tokenwire if "serve-store-secret" in line]
    finally:
        serve.stop()
