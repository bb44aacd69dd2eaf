"""A batch's completion window through real processes (echo workers): the gateway's
``--batch-window-seconds`` makes "24h" last 4 s, and slow workers keep the batch from finishing in it.
On both stores: SQLite under --data-dir, and Redis (--store redis://...)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator

import openai
import pytest

from tests import harness
from tests.conftest import API_KEY, EchoSystem, chat_batch_file, start_echo_system, stop_system
from tests.redis_server import RedisServer

WINDOW = 4
REQUESTS = 60


@pytest.fixture(scope="module", params=["data-dir", "redis"])
def system(request: pytest.FixtureRequest) -> Iterator[EchoSystem]:
    redis = RedisServer().start() if request.param == "redis" else None
    where = ("--store", redis.url) if redis else ("--data-dir", tempfile.mkdtemp(prefix="tokenwire-expiry-"))
    # 16 tokens at 0.1 s: each request takes 1.6 s, and the workers run about 8 at once: the window
    # holds a third of the 60 at most.
    started = start_echo_system(delay=0.1, tokens=16, gateway_args=(*where, "--batch-window-seconds", str(WINDOW)))
    yield started
    stop_system(started)
    if redis is not None:
        redis.stop()


def test_a_batch_past_its_window_expires_keeping_what_it_made(system: EchoSystem) -> None:
    client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
    uploaded = client.files.create(file=("e.jsonl", chat_batch_file(REQUESTS, "e")), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.expires_at == batch.created_at + WINDOW
    done = harness.wait_until(
        lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "expired") and b,
        60,
        interval=0.3,
        what="the batch ended",
    )
    assert done.status == "expired" and done.expired_at is not None and done.expired_at >= batch.expires_at
    assert done.output_file_id and done.error_file_id
    made = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    expired = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert made and all(x["response"]["status_code"] == 200 for x in made)
    assert expired and all(x["error"]["code"] == "batch_expired" and x["response"] is None for x in expired)
    # Every request once: made in the window, or expired.
    assert sorted(x["custom_id"] for x in made + expired) == sorted(f"e{i}" for i in range(REQUESTS))
    assert done.request_counts is not None and done.request_counts.completed == len(made)
