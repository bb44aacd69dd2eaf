"""Continuous batching end to end: a gateway, one llama_cpp worker (SmolLM2-135M,
``--parallel 4 --max-queue 2``) and the REST bridge as real processes, the openai
SDK as the client, the worker's GetStats (gRPC) and /metrics as the counters.

Everything asserted is counted (sequences per step, prompt tokens evaluated,
KV cells, queue length), never timed.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests import harness
from workers.engines.llama_cpp import loading

pytestmark = pytest.mark.models

MODEL = "smollm2-135m-instruct"
PARALLEL = 4
MAX_QUEUE = 2
EOG_BAN = {"0": -100, "2": -100, "4": -100}  # keep generating
STORY = [{"role": "user", "content": "Write a long story about a dragon who lives in a castle."}]


@dataclass
class Stack:
    gateway: harness.Proc
    worker: harness.Proc
    bridge: harness.Proc
    metrics_port: int

    def stats(self):  # type: ignore[no-untyped-def]
        return harness.worker_stats(self.worker.address)

    def metrics(self) -> dict[str, float]:
        return harness.scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    gateway = harness.gateway()
    port = free_port()
    worker = harness.worker(
        gateway.address,
        "--engine", "llama_cpp", "--n-ctx", "2048", "--parallel", str(PARALLEL), "--max-queue", str(MAX_QUEUE),
        "--prefix-cache", "4", "--metrics-port", str(port),
    )  # fmt: skip
    bridge = harness.bridge(gateway.address)
    url = f"http://{bridge.address}"
    harness.wait_for_workers(url, MODEL, 1)
    yield Stack(gateway, worker, bridge, port)
    for proc in (bridge, worker, gateway):
        proc.stop()


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{stack.bridge.address}/v1", api_key="none", max_retries=0, timeout=300)


def idle(stack: Stack):  # type: ignore[no-untyped-def]
    """Wait until nothing runs and no KV cell is held by a running sequence."""
    return harness.wait_until(
        lambda: (s := stack.stats()).in_flight == 0 and s.running_sequences == 0 and s.kv_cells_in_use == 0 and s,
        timeout=60,
    )


def test_the_worker_keeps_its_kv_cache_in_huge_pages(stack: Stack) -> None:
    """The worker restarted itself, in place, with glibc's huge pages: its KV cache is in them."""
    if not loading._thp_on_request():
        pytest.skip("this kernel gives transparent huge pages to all memory or to none")
    assert stack.worker.process is not None
    proc = Path(f"/proc/{stack.worker.process.pid}")  # the pid we started: the restart was an exec
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in (proc / "environ").read_bytes().split(b"\0")
    huge_kb = next(int(line.split()[1]) for line in (proc / "smaps_rollup").open() if line.startswith("AnonHuge"))
    # Per-sequence KV: streams x cells x bytes a cell (SmolLM2-135M: 30 layers, K and V of 3 heads x 64, f16).
    kv_bytes = PARALLEL * 2048 * (30 * 2 * 3 * 64 * 2)
    assert huge_kb * 1024 >= kv_bytes


def test_concurrent_streams_share_decode_steps(stack: Stack, client: openai.OpenAI) -> None:
    before = idle(stack)
    prompts = ["Describe a walk on the beach.", "Explain how bread is made.", "Tell me about the moon.", "Hi!"]

    def ask(text: str) -> int:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": text}],
            max_tokens=32,
            temperature=0.7,
            seed=3,
            logit_bias=EOG_BAN,  # type: ignore[arg-type]
        )
        assert reply.usage is not None
        return reply.usage.completion_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == [32] * len(prompts)
    after = idle(stack)
    assert after.parallel == PARALLEL and after.capacity == PARALLEL
    assert after.max_sequences_per_step > 1
    steps = after.decode_steps - before.decode_steps
    # 128 generated tokens (+ prompts) in fewer steps than tokens: steps were shared.
    assert steps < 4 * 32
    metrics = stack.metrics()
    label = f'{{model="{MODEL}"}}'
    assert metrics[f"tokenwire_engine_step_sequences_count{label}"] == after.decode_steps
    # Steps that carried more than one sequence were observed in the histogram.
    assert metrics[f'tokenwire_engine_step_sequences_bucket{{le="1.0",model="{MODEL}"}}'] < after.decode_steps
    assert metrics[f"tokenwire_engine_running_sequences{label}"] == 0


def test_n_choices_share_the_prompt(stack: Stack, client: openai.OpenAI) -> None:
    before = idle(stack)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a short poem about the sea, the wind and the stars."}],
        n=4,
        max_tokens=8,
        temperature=0.9,
        seed=5,
    )
    assert len(reply.choices) == 4 and reply.usage is not None
    prompt = reply.usage.prompt_tokens
    after = idle(stack)
    evaluated = after.prompt_tokens_evaluated - before.prompt_tokens_evaluated
    reused = after.prompt_tokens_reused - before.prompt_tokens_reused
    # Four evaluations would be 4 * prompt; the choices after the first reuse its KV
    # (all of it while it is being evaluated, its whole 32-token chunks once it is done).
    assert prompt > 32
    assert evaluated < 2 * prompt
    assert reused >= 3 * 32


def test_second_turn_hits_the_prefix_cache(stack: Stack, client: openai.OpenAI) -> None:
    question = "My name is Ada and I live in a small house by the river. What could I plant in my garden?"
    turn1 = [{"role": "user", "content": question}]
    first = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    before = idle(stack)
    turn2 = [
        *turn1,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And what about flowers?"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    after = idle(stack)
    assert first.usage is not None and second.usage is not None
    reused = after.prompt_tokens_reused - before.prompt_tokens_reused
    evaluated = after.prompt_tokens_evaluated - before.prompt_tokens_evaluated
    assert reused >= first.usage.prompt_tokens // 32 * 32 > 0
    assert evaluated == second.usage.prompt_tokens - reused


def test_429_when_every_sequence_and_the_queue_are_taken(stack: Stack, client: openai.OpenAI) -> None:
    idle(stack)
    streams = []

    def open_stream() -> openai.Stream:  # type: ignore[type-arg]
        return client.chat.completions.create(
            model=MODEL,
            messages=STORY,
            max_tokens=1500,
            temperature=0.7,
            seed=1,
            logit_bias=EOG_BAN,
            stream=True,  # type: ignore[arg-type]
        )

    mark, before = stack.worker.log_mark(), stack.stats()
    try:
        for _ in range(PARALLEL):  # running: each has sent its first chunk
            stream = open_stream()
            next(iter(stream))
            streams.append(stream)
        waiting: list[openai.Stream] = []  # type: ignore[type-arg]
        threads = [threading.Thread(target=lambda: waiting.append(open_stream())) for _ in range(MAX_QUEUE)]
        for t in threads:
            t.start()
        full = harness.wait_until(
            lambda: (s := stack.stats()).queue_length == MAX_QUEUE and s.running_sequences == PARALLEL and s,
            timeout=60,
        )
        assert full.in_flight == PARALLEL and full.waiting_sequences == 0
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=4)  # type: ignore[arg-type]
        assert info.value.status_code == 429
    finally:
        for stream in streams:
            stream.close()
    for t in threads:
        t.join(120)
    for stream in waiting:
        stream.close()
    after = idle(stack)
    cancelled = after.cancelled_total - before.cancelled_total
    assert cancelled >= PARALLEL
    figures = harness.after_cancel(stack.worker, mark, cancelled)
    assert max(figures) <= 1, figures


def test_cancelled_streams_leave_no_sequence_or_kv_behind(stack: Stack, client: openai.OpenAI) -> None:
    idle(stack)
    rng = random.Random(12)

    def cancel_at(k: int) -> None:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=STORY,
            max_tokens=400,
            temperature=0.7,
            seed=k,
            logit_bias=EOG_BAN,
            stream=True,  # type: ignore[arg-type]
        )
        stop = rng.randint(1, 12)
        for i, _ in enumerate(stream):
            if i >= stop:
                break
        stream.close()

    mark, before = stack.worker.log_mark(), stack.stats()
    # Three clients: a closed stream holds its slot until the worker has seen the
    # cancel, so three new ones plus three leaving fit the 4 slots and the queue of 2.
    with ThreadPoolExecutor(PARALLEL - 1) as pool:
        list(pool.map(cancel_at, range(24)))
    after = harness.wait_until(
        lambda: (s := stack.stats()).cancelled_total >= before.cancelled_total + 24 and s, timeout=120
    )
    after = idle(stack)
    assert after.running_sequences == 0 and after.kv_cells_in_use == 0
    figures = harness.after_cancel(stack.worker, mark, after.cancelled_total - before.cancelled_total)
    assert len(figures) >= 24 and max(figures) <= 1, figures
