"""Files and batches in the replicas' shared store: two front ends over one real Redis.

A standalone registry, slow echo workers registered there, two ``tokenwire front-end``
processes with ``--store redis://...`` (and each its own default --data-dir, as on two
machines): a batch uploaded and created on one is read, listed, cancelled and downloaded on
the other; it runs once with both up; the front end holding the runner's lease is killed
mid-run and the other finishes it; Redis killed mid-run is 503 store_unavailable, and the
batch goes on when it is back. Each custom_id is in the output exactly once.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from tests import harness
from tests.conftest import CHAT_MODEL, chat_batch_file
from tests.redis_server import RedisServer

KEY, OTHER_KEY = "shared-key-1", "shared-key-2"
LEASE = "tokenwire:batch:runner"
DONE = ("completed", "failed", "cancelled", "expired")


@dataclass
class Fleet:
    redis: RedisServer
    registry: harness.Proc
    workers: list[harness.Proc]
    front_ends: list[harness.Proc]

    def client(self, replica: int, key: str = KEY) -> openai.OpenAI:
        url = f"http://{self.front_ends[replica].part_address('bridge')}/v1"
        return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=20)

    def runner(self) -> int:
        """Which front end holds the runner's lease (its value names the process)."""
        holder = self.redis.command(None, "GET", LEASE)
        pids = [front.process.pid if front.process else 0 for front in self.front_ends]
        return pids.index(int(holder.split(":")[1]))


@pytest.fixture
def fleet(redis_server: RedisServer) -> Iterator[Fleet]:
    registry = harness.Proc(["registry", "--port", "0", "--heartbeat-expiry", "3"]).start()
    # 12 tokens at 50 ms: 0.6 s a request, a few at once per worker: a batch of 60 runs for seconds.
    echo = ("--echo-tokens", "12", "--echo-delay", "0.05")
    workers = [harness.echo_worker(registry.address, CHAT_MODEL, *echo) for _ in range(2)]
    store = ("--store", redis_server.url, "--store-timeout-ms", "2000")
    front_ends = [
        harness.front_end(
            ["--controller-address", registry.address, *store], store, env={"TOKENWIRE_API_KEYS": f"{KEY},{OTHER_KEY}"}
        )
        for _ in range(2)
    ]
    fleet = Fleet(redis_server, registry, workers, front_ends)
    try:
        for replica in range(2):
            harness.wait_for_workers(f"http://{front_ends[replica].part_address('bridge')}", CHAT_MODEL, 2, key=KEY)
        yield fleet
    finally:
        for proc in (*front_ends, *workers, registry):
            proc.stop()


def submit(client: openai.OpenAI, count: int, prefix: str) -> Any:
    uploaded = client.files.create(file=("requests.jsonl", chat_batch_file(count, prefix)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def finished(client: openai.OpenAI, batch_id: str) -> Any:
    return harness.wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in DONE and b,
        120,
        interval=0.3,
        what=f"batch {batch_id} finished",
    )


def output(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """The output file's lines by custom_id, each custom_id once."""
    assert file_id is not None
    lines = [json.loads(text) for text in client.files.content(file_id).text.splitlines()]
    by_id = {item["custom_id"]: item for item in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


def committed(redis: RedisServer, batch_id: str) -> dict[str, dict[str, Any]]:
    """The results Redis holds now, read as an operator would (redis-cli)."""
    reply = redis.command(None, "HGETALL", f"tokenwire:batch:batch:{batch_id}:results").splitlines()
    return {custom_id: json.loads(result) for custom_id, result in zip(reply[::2], reply[1::2], strict=True)}


def test_any_front_end_serves_any_batch_and_it_runs_once(fleet: Fleet) -> None:
    a, b = fleet.client(0), fleet.client(1)
    assert not any("appendonly is off" in front.log() for front in fleet.front_ends)  # the fixture's has it on
    batch = submit(a, 30, "s")
    # B knows what A made: per-front-end state (each its own --data-dir) would be 404 here.
    seen = b.batches.retrieve(batch.id)
    assert seen.id == batch.id and seen.input_file_id == batch.input_file_id
    assert batch.id in [listed.id for listed in b.batches.list()]
    assert batch.input_file_id in [listed.id for listed in b.files.list()]
    assert b.files.content(batch.input_file_id).content == chat_batch_file(30, "s")
    # Another key sees nothing, on either front end.
    other = fleet.client(1, OTHER_KEY)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(batch.input_file_id)
    assert batch.id not in [listed.id for listed in other.batches.list()]
    # Run with both up: one runner, each request once.
    done = finished(b, batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (30, 30, 0)
    results = output(b, done.output_file_id)
    assert sorted(results) == sorted(f"s{i}" for i in range(30))
    assert all(item["response"]["status_code"] == 200 for item in results.values())
    assert output(a, done.output_file_id) == results  # one file, whichever front end serves it
    # Cancel on B a batch created on A; A sees it cancelled, with what was made before.
    second = submit(a, 60, "c")
    harness.wait_until(
        lambda: len(committed(fleet.redis, second.id)) >= 2, 60, interval=0.1, what="the second batch under way"
    )
    assert b.batches.cancel(second.id).status in ("cancelling", "cancelled")
    cancelled = finished(a, second.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts is not None
    assert 2 <= cancelled.request_counts.completed < 60
    assert len(output(a, cancelled.output_file_id)) == cancelled.request_counts.completed


def test_the_front_end_running_the_batches_dies_and_the_other_finishes(fleet: Fleet) -> None:
    client = fleet.client(0)
    batch = submit(client, 60, "k")
    harness.wait_until(lambda: len(committed(fleet.redis, batch.id)) >= 8, 60, interval=0.1, what="8 results committed")
    holder = fleet.runner()
    fleet.front_ends[holder].signal(signal.SIGKILL)  # mid-run, its requests in flight
    before = committed(fleet.redis, batch.id)
    survivor = fleet.client(1 - holder)
    done = finished(survivor, batch.id)  # after the dead one's lease runs out
    assert fleet.runner() == 1 - holder
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 60
    results = output(survivor, done.output_file_id)
    assert sorted(results) == sorted(f"k{i}" for i in range(60))
    for custom_id, result in before.items():  # the same line, not a second run
        assert results[custom_id] == result


def test_redis_down_is_503_and_the_batch_resumes_when_it_is_back(fleet: Fleet) -> None:
    client = fleet.client(1)
    batch = submit(client, 40, "r")
    harness.wait_until(lambda: len(committed(fleet.redis, batch.id)) >= 4, 60, interval=0.1, what="4 results committed")
    fleet.redis.pause()  # hung: its port accepts, nothing answers: 503 after the deadline, never a hang
    for replica in range(2):
        with pytest.raises(openai.APIStatusError) as caught:
            fleet.client(replica).batches.retrieve(batch.id)
        assert caught.value.status_code == 503
    fleet.redis.resume()
    fleet.redis.kill()
    for replica in range(2):
        with pytest.raises(openai.APIStatusError) as caught:
            fleet.client(replica).batches.retrieve(batch.id)
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "store_unavailable"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as caught:
            fleet.client(replica).files.list()
        assert caught.value.status_code == 503
    fleet.redis.start()  # its append-only file (appendfsync always here): what it had acknowledged is back

    def answers() -> bool:  # as a client does after a 503: again after its Retry-After
        try:
            return client.batches.retrieve(batch.id).id == batch.id
        except openai.APIStatusError as error:
            assert error.status_code == 503
            return False

    harness.wait_until(answers, what="the batch API answers again")
    done = finished(client, batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 40
    assert sorted(output(client, done.output_file_id)) == sorted(f"r{i}" for i in range(40))


def test_a_redis_without_its_append_only_file_is_warned_of_once(redis_server: RedisServer) -> None:
    redis_server.command(None, "CONFIG", "SET", "appendonly", "no")
    gateway = harness.gateway("--store", redis_server.url)
    try:
        assert gateway.log().count("appendonly is off: a restart of Redis loses every file and batch") == 1
    finally:
        gateway.stop()
