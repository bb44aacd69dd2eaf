"""Deadlines, admission control, per-key limits, worker faults, graceful
shutdown and hostile input: nothing lost, nothing leaked, never a 5xx for a
client mistake."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, EMBED_MODEL, EchoSystem, start_echo_system, stop_system
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

AUTH = (("authorization", f"Bearer {API_KEY}"),)
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
HEARTBEAT_EXPIRY_DEFAULT = 15.0  # the gateway's --heartbeat-expiry when not given


def chat_body(content: str = "long story", **extra: object) -> dict:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}], **extra}


def worker_totals(system: EchoSystem) -> tuple[int, int]:
    stats = [harness.worker_stats(w.address) for w in system.chat_workers if w.alive()]
    return sum(s.in_flight for s in stats), sum(s.cancelled_total for s in stats)


def busy_worker(system: EchoSystem) -> harness.Proc:
    return harness.wait_until(
        lambda: next((w for w in system.chat_workers if harness.worker_stats(w.address).in_flight), None)
    )


# -- deadlines ------------------------------------------------------------------------


def settled_cancels(system: EchoSystem) -> int:
    """Cancels counted once nothing runs: an earlier test's cancelled call may still be finishing."""
    return harness.wait_until(lambda: (t := worker_totals(system))[0] == 0 and (t[1],))[0]  # type: ignore[no-any-return]


# slow_system's answers take 4 s at the least: 200 tokens, each after a 20 ms sleep.
WHOLE_ANSWER = 200 * 0.02


def test_rest_deadline_is_504_and_stops_the_worker(slow_system: EchoSystem) -> None:
    cancelled = settled_cancels(slow_system)
    deadline = 0.5
    started = time.monotonic()
    reply = httpx.post(
        f"{slow_system.url}/v1/chat/completions",
        json=chat_body(),
        headers={**HEADERS, "X-Request-Timeout": str(deadline)},
        timeout=30,
    )
    answered_after = time.monotonic() - started
    assert reply.status_code == 504
    assert reply.json()["error"]["code"] == "timeout"
    # The worker's call was cancelled, not finished...
    harness.wait_until(lambda: worker_totals(slow_system) == (0, cancelled + 1))
    # ...and the 504 came at the deadline (the time under test): not before it, and
    # long before the whole answer could have been made (a margin of 7 deadlines).
    assert deadline * 0.9 <= answered_after < WHOLE_ANSWER


def test_rest_deadline_mid_stream_is_an_error_event(slow_system: EchoSystem) -> None:
    with httpx.stream(
        "POST",
        f"{slow_system.url}/v1/chat/completions",
        json=chat_body(stream=True),
        headers={**HEADERS, "X-Request-Timeout": "0.5"},
        timeout=30,
    ) as reply:
        assert reply.status_code == 200
        events = [line.removeprefix("data: ") for line in reply.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "timeout"


def test_sdk_timeout_reaches_the_worker(slow_system: EchoSystem) -> None:
    cancelled = settled_cancels(slow_system)
    client = openai.OpenAI(base_url=f"{slow_system.url}/v1", api_key=API_KEY, max_retries=0, timeout=0.5)
    with pytest.raises((openai.APITimeoutError, openai.APIStatusError)):
        client.chat.completions.create(**chat_body())
    harness.wait_until(lambda: worker_totals(slow_system) == (0, cancelled + 1))


async def test_grpc_deadline_exceeded(slow_system: EchoSystem) -> None:
    cancelled = await asyncio.to_thread(settled_cancels, slow_system)
    async with grpc.aio.insecure_channel(slow_system.grpc_address) as channel:
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        request = api_pb2.CreateChatCompletionRequest(
            model=CHAT_MODEL, messages=[common_pb2.ChatMessage(role="user", content="x")]
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateChatCompletion(request, metadata=AUTH, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.to_thread(harness.wait_until, lambda: worker_totals(slow_system) == (0, cancelled + 1))


# -- admission control ------------------------------------------------------------------


def test_full_workers_answer_429_at_once() -> None:
    # One worker, one running call, one queued: the third concurrent call is refused.
    system = start_echo_system(
        delay=0.05, tokens=40, chat_workers=1, worker_args=("--limit-worker-concurrency", "1", "--max-queue", "1")
    )
    try:
        client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
        results: list[object] = []

        def call() -> None:
            try:
                results.append(client.chat.completions.create(**chat_body()))
            except openai.APIStatusError as error:
                results.append(error)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for thread in threads:
            thread.start()
        worker = system.chat_workers[0]
        harness.wait_until(lambda: harness.worker_stats(worker.address).queue_length == 1, what="the queue full")
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**chat_body())
        # Refused at once, not queued: answered while the worker was as full as before
        # (a place frees only when the running call ends, 40 tokens x 50 ms after it began).
        full = harness.worker_stats(worker.address)
        assert (full.in_flight, full.queue_length, results) == (1, 1, [])
        assert caught.value.status_code == 429
        assert caught.value.code == "rate_limit_exceeded"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        for thread in threads:
            thread.join()
        assert all(isinstance(r, openai.types.chat.ChatCompletion) for r in results)
        assert harness.worker_stats(system.chat_workers[0].address).in_flight == 0
    finally:
        stop_system(system)


def test_per_key_rate_limits(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# key and limits\nslow-key rpm=2\nthrifty-key tpm=10\nfree-key\n")
    gateway = harness.gateway("--api-keys-file", str(keys))
    worker = harness.echo_worker(gateway.address, CHAT_MODEL)
    bridge = harness.bridge(gateway.address)
    url = f"http://{bridge.address}"
    try:
        harness.wait_for_workers(url, CHAT_MODEL, 1, key="free-key")

        def client(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

        slow = client("slow-key")
        for _ in range(2):
            slow.chat.completions.create(**chat_body("a"), max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            slow.chat.completions.create(**chat_body("a"), max_tokens=1)
        assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
        # 3 prompt + 16 completion tokens: over the 10 tokens per minute.
        thrifty = client("thrifty-key")
        thrifty.chat.completions.create(**chat_body("a b"))
        with pytest.raises(openai.RateLimitError):
            thrifty.chat.completions.create(**chat_body("a b"))
        # Other keys are not affected.
        for _ in range(5):
            client("free-key").chat.completions.create(**chat_body("a"), max_tokens=1)
        # Keys never reach the logs.
        for proc in (gateway, bridge, worker):
            assert "slow-key" not in proc.log() and "thrifty-key" not in proc.log()
    finally:
        for proc in (bridge, worker, gateway):
            proc.stop()


# -- worker faults ------------------------------------------------------------------------


@pytest.fixture
def fresh_slow_system():
    system = start_echo_system(delay=0.02, tokens=200)
    yield system
    stop_system(system)


def test_worker_killed_mid_stream_rest(fresh_slow_system: EchoSystem) -> None:
    system = fresh_slow_system
    with httpx.stream(
        "POST", f"{system.url}/v1/chat/completions", json=chat_body(stream=True), headers=HEADERS, timeout=30
    ) as reply:
        lines = reply.iter_lines()
        for _ in range(5):
            next(lines)
        busy_worker(system).kill()
        rest = [line.removeprefix("data: ") for line in lines if line]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "service_unavailable"
    # The next requests go to the live worker.
    client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
    for _ in range(4):
        assert client.chat.completions.create(**chat_body("ok"), max_tokens=2).choices[0].message.content == "ok ok"


async def test_worker_killed_mid_stream_grpc(fresh_slow_system: EchoSystem) -> None:
    system = fresh_slow_system
    async with grpc.aio.insecure_channel(system.grpc_address) as channel:
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        request = api_pb2.CreateChatCompletionRequest(
            model=CHAT_MODEL, messages=[common_pb2.ChatMessage(role="user", content="x")]
        )
        call = stub.StreamChatCompletion(api_pb2.StreamChatCompletionRequest(request=request), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            received = 0
            async for _ in call:
                received += 1
                if received == 5:
                    (await asyncio.to_thread(busy_worker, system)).kill()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_request_retried_on_another_worker_before_its_first_token() -> None:
    # 1.5 s before each token: time to kill the worker between acceptance and the first token.
    system = start_echo_system(delay=1.5, tokens=2)
    try:
        client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(client.chat.completions.create(**chat_body("again"))))
        thread.start()
        busy_worker(system).kill()
        thread.join(30)
        assert result and result[0].choices[0].message.content == "again again"  # type: ignore[attr-defined]
    finally:
        stop_system(system)


def test_silent_worker_is_dropped_and_comes_back(fresh_slow_system: EchoSystem) -> None:
    system = fresh_slow_system
    frozen = system.chat_workers[0]
    mark = system.gateway.log_mark()
    frozen.signal(signal.SIGSTOP)  # alive but silent: no heartbeats
    try:
        started = time.monotonic()
        harness.wait_for_workers(system.url, CHAT_MODEL, 1, key=API_KEY, timeout=HEARTBEAT_EXPIRY_DEFAULT * 2)
        dropped_after = time.monotonic() - started
    finally:
        frozen.signal(signal.SIGCONT)
    # Dropped by the expiry (the time under test: --heartbeat-expiry 3, checked every
    # 0.75 s, heartbeats every 0.5 s): not before 3 s of silence, less the last
    # heartbeat's age, and far from the default expiry, 15 s.
    assert "missed its heartbeats for 3.0 s; dropped" in system.gateway.log(mark)
    assert 3 - 2 * 0.5 <= dropped_after < HEARTBEAT_EXPIRY_DEFAULT
    harness.wait_for_workers(system.url, CHAT_MODEL, 2, key=API_KEY)


# -- graceful shutdown ----------------------------------------------------------------------


def test_gateway_sigterm_finishes_streams_then_exits_zero() -> None:
    system = start_echo_system(delay=0.02, tokens=60)
    try:
        client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
        stream = client.chat.completions.create(**chat_body(stream=True))
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        system.gateway.signal(signal.SIGTERM)
        harness.wait_until(lambda: refuses_calls(system.gateway.address), what="the gateway refusing new calls")
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(**chat_body("new"), max_tokens=1)
        assert caught.value.status_code == 503
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "stop"  # all 60 echo tokens, under max_tokens
        assert sum(1 for c in rest if c.choices and c.choices[0].delta.content) == 60
        assert system.gateway.process.wait(15) == 0
    finally:
        stop_system(system)


def refuses_calls(address: str) -> bool:
    """Whether a gRPC server stopped taking calls (a health check on a new connection fails)."""
    try:
        with grpc.insecure_channel(address) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as error:
        return bool(error.code() == grpc.StatusCode.UNAVAILABLE)
    return False


def test_one_process_front_end_sigterm_drains_the_bridge_then_stops_the_gateway() -> None:
    """serve's front end: a stream open at SIGTERM gets every token and [DONE] through the
    gateway in the same process, which stops only after the bridge has finished."""
    front = harness.Proc(["front-end", "--port", "0", "--bridge", "--port", "0"]).start()
    assert front.launched is not None
    worker = None
    try:
        harness.wait_until(lambda: front.launched is not None and front.launched.part_address("bridge"))
        url = "http://" + front.launched.part_address("bridge")
        worker = harness.echo_worker(
            front.launched.part_address("gateway"), "echo-drain", "--echo-tokens", "60", "--echo-delay", "0.02"
        )
        harness.wait_for_workers(url, "echo-drain", 1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model="echo-drain", messages=[{"role": "user", "content": "a b"}], stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        front.signal(signal.SIGTERM)
        rest = list(stream)  # the SDK stops at [DONE]
        assert rest[-1].choices[0].finish_reason == "stop"
        assert sum(1 for c in rest if c.choices and c.choices[0].delta.content) == 60
        assert front.process is not None and front.process.wait(15) == 0
    finally:
        if worker is not None:
            worker.stop()
        front.stop()
    log = front.log()
    assert log.index("Shutting down") < log.index("gateway shutting down"), log
    assert "Traceback" not in log


def test_worker_sigterm_deregisters_then_finishes(fresh_slow_system: EchoSystem) -> None:
    system = fresh_slow_system
    client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
    stream = client.chat.completions.create(**chat_body(stream=True), max_tokens=50)
    next(iter(stream))
    leaving = busy_worker(system)
    leaving.signal(signal.SIGTERM)
    harness.wait_for_workers(system.url, CHAT_MODEL, 1, key=API_KEY)
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    assert leaving.process.wait(15) == 0
    assert "deregistered" in system.gateway.log()


# -- hostile and malformed input ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_system():
    system = start_echo_system(
        gateway_args=("--max-n", "4", "--max-tokens-limit", "100"), bridge_args=("--max-body-bytes", "20000")
    )
    yield system
    stop_system(system)


def post(system: EchoSystem, path: str, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{system.url}{path}", headers=HEADERS, timeout=30, **kwargs)  # type: ignore[arg-type]


def test_body_over_the_limit_is_413(bounded_system: EchoSystem) -> None:
    reply = post(bounded_system, "/v1/chat/completions", json=chat_body("x" * 50000))
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat_body(n=5), "n"),
        ("/v1/chat/completions", chat_body(max_tokens=101), "max_tokens"),
        ("/v1/chat/completions", chat_body(max_completion_tokens=101), "max_completion_tokens"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": []}, "prompt"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "logprobs": 9}, "logprobs"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": ["a"] * 2049}, "input"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": ["a", ""]}, "input"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": []}, "input"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": "a", "dimensions": 9999}, "dimensions"),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].tool_call_id",
        ),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "assistant"}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_input_is_400_naming_the_param(bounded_system: EchoSystem, path: str, body: dict, param: str) -> None:
    reply = post(bounded_system, path, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_invalid_utf8_is_400(bounded_system: EchoSystem) -> None:
    body = b'{"model": "echo-chat", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    reply = httpx.post(
        f"{bounded_system.url}/v1/chat/completions",
        content=body,
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 400
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
