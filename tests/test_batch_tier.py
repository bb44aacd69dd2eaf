"""The batch tier's rules that hold whatever the model (echo workers, real processes):

- batch requests are not subject to the key's requests per minute, but their tokens count
  to its tokens per minute;
- progress shows in the gateway's metrics;
- a request a worker refuses (429) is tried again, and its one result committed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests import harness
from tests.conftest import API_KEY, EchoSystem, chat_batch_file, start_echo_system, stop_system

REQUESTS = 12


LIMITED_KEY = "limited-batch-key"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoSystem]:
    """LIMITED_KEY at 3 requests and 100 tokens a minute."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{LIMITED_KEY} rpm=3 tpm=100\n")
    system = start_echo_system(gateway_args=("--api-keys-file", str(keys), "--metrics-port", "0"), tokens=8)
    yield system
    stop_system(system)


def metric(system: EchoSystem, name: str) -> float:
    text = httpx.get(f"http://{system.gateway.metrics_address}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_batch_is_not_held_to_rpm_and_its_tokens_count_to_the_key(limited: EchoSystem) -> None:
    client = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=LIMITED_KEY, max_retries=0)
    uploaded = client.files.create(file=("t.jsonl", chat_batch_file(REQUESTS, "t")), purpose="batch")  # request 1 of 3
    client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")  # 2
    done = 'tokenwire_batch_requests_total{status="completed"}'
    harness.wait_until(lambda: metric(limited, done) == REQUESTS, 60, what=f"{REQUESTS} batch requests done")
    assert metric(limited, "tokenwire_batch_tokens_total") > 100
    # Four times the key's requests per minute ran; their tokens are the key's: the next call is over its tpm.
    with pytest.raises(openai.RateLimitError) as refused:
        client.models.list()  # request 3 of 3: within rpm
    assert "tokens per minute" in str(refused.value)


@pytest.fixture(scope="module")
def refusing() -> Iterator[EchoSystem]:
    """One worker of 2 slots, one kept from batch calls, and no queue: the runner, which counts
    2 free slots, sends a second call that the worker refuses (429) each time it has room."""
    worker_args = ("--limit-worker-concurrency", "2", "--reserved-slots", "1", "--max-queue", "0")
    system = start_echo_system(
        chat_workers=1, tokens=4, delay=0.1, worker_args=worker_args, gateway_args=("--metrics-port", "0")
    )
    yield system
    stop_system(system)


def test_a_request_the_worker_refuses_is_tried_again_and_its_result_committed_once(refusing: EchoSystem) -> None:
    client = openai.OpenAI(base_url=f"{refusing.url}/v1", api_key=API_KEY, max_retries=0)
    uploaded = client.files.create(file=("r.jsonl", chat_batch_file(5, "r")), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = harness.wait_until(
        lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
        120,
        interval=0.3,
        what="the batch ended",
    )
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 5
    assert done.error_file_id is None and done.output_file_id
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"r{i}" for i in range(5)]
    # More calls than requests: the worker did refuse some (each call is one routing decision).
    text = httpx.get(f"http://{refusing.gateway.metrics_address}/metrics", timeout=10).text
    calls = sum(float(v) for v in re.findall(r"^tokenwire_routing_decisions_total\{.*\} (\S+)$", text, re.MULTILINE))
    assert calls > 5
