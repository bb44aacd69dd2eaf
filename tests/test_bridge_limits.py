"""The REST bridge's connection limits and SSE keep-alives, through real processes.

- ``--request-read-timeout``: half-open connections (slowloris) are closed, while
  ordinary requests keep being served; kept-alive idle connections are not affected.
- ``--max-connections``: past the cap, 503 with Retry-After and OpenAI's error body.
- ``--sse-keepalive-interval``: a stream queued behind other work says ``: keep-alive``,
  and the OpenAI SDK parses such a stream as any other.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, ECHO_CONTEXT, EchoSystem, start_echo_system, stop_system

READ_TIMEOUT = 2.0
KEEPALIVE_INTERVAL = 0.3
DEFAULT_READ_TIMEOUT = 5.0  # what would close connections if the flag were not heeded
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
HALF_REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
MESSAGES = [{"role": "user", "content": "alpha beta gamma"}]


@pytest.fixture(scope="module")
def limited() -> Iterator[EchoSystem]:
    """One echo chat worker running one request at a time with one queue place
    (50 ms a token), behind a bridge with a 2 s read deadline and 0.3 s keep-alives."""
    system = start_echo_system(
        delay=0.05,
        tokens=40,
        chat_workers=1,
        worker_args=("--limit-worker-concurrency", "1", "--max-queue", "1"),
        bridge_args=(
            "--request-read-timeout",
            str(READ_TIMEOUT),
            "--sse-keepalive-interval",
            str(KEEPALIVE_INTERVAL),
        ),
    )
    yield system
    stop_system(system)


def address(system: EchoSystem | harness.Proc) -> tuple[str, int]:
    text = system.bridge.address if isinstance(system, EchoSystem) else system.address
    host, port = text.rsplit(":", 1)
    return host, int(port)


def sdk(url: str, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, **options)  # type: ignore[arg-type]


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a hang fails after 30 s)."""
    sock.settimeout(harness.WAIT_TIMEOUT)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def http_request(path: str, body: bytes = b"", method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def read_response(sock: socket.socket) -> bytes:
    """One whole response (with a Content-Length) from a kept-alive connection."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


def read_timeouts(system: EchoSystem, phase: str) -> float:
    """Connections the bridge closed for its read deadline, waiting for ``phase``."""
    return harness.scrape(f"{system.url}/metrics").get(f'tokenwire_http_read_timeouts_total{{phase="{phase}"}}', 0)


def worker_busy(system: EchoSystem, queued: int = 0) -> bool:
    stats = harness.worker_stats(system.chat_workers[0].address)
    return stats.in_flight == 1 and stats.queue_length == queued


def hold_the_slot(system: EchoSystem) -> threading.Thread:
    """A 2 s request (40 tokens at 50 ms) that holds the worker's only slot."""
    thread = threading.Thread(
        target=lambda: sdk(system.url).chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    )
    thread.start()
    harness.wait_until(lambda: worker_busy(system))
    return thread


# -- the read deadline --------------------------------------------------------------------


def test_500_half_open_connections_are_closed_while_requests_are_served(limited: EchoSystem) -> None:
    client = sdk(limited.url, timeout=10)
    served: list[str] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def ordinary_requests() -> None:
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)
                served.append(reply.choices[0].message.content or "")
            except Exception as error:
                failed.append(error)

    timed_out = read_timeouts(limited, "head")
    thread = threading.Thread(target=ordinary_requests)
    thread.start()
    try:
        sockets = []
        for _ in range(500):
            opened = time.monotonic()
            sock = socket.create_connection(address(limited), timeout=5)
            sock.sendall(HALF_REQUEST)
            sockets.append((sock, opened))
        answers: list[bytes] = []
        closed_after: list[float] = []
        for sock, opened in sockets:
            answers.append(read_until_closed(sock))
            closed_after.append(time.monotonic() - opened)
            sock.close()
        served_during = len(served)
    finally:
        stop.set()
        thread.join()
    assert not failed, failed[:3]
    assert served_during >= 5 and all(text == "alpha beta" for text in served)
    # Closed by the read deadline, as the bridge counts them: each one a head that never came...
    assert read_timeouts(limited, "head") - timed_out == 500
    # ...at its deadline (the time under test): never before it, and each well before the
    # default deadline, 5 s, would have closed it (the read is in order: a closed socket
    # waits for those before it, so the later ones are seen late, never early).
    assert READ_TIMEOUT * 0.95 <= min(closed_after)
    assert max(closed_after) < DEFAULT_READ_TIMEOUT
    # Part of a request came: each gets a 408 in OpenAI's envelope.
    assert {status_of(answer) for answer in answers} == {408}
    error = json_of(answers[0])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_a_silent_connection_is_closed_without_an_answer(limited: EchoSystem) -> None:
    timed_out = read_timeouts(limited, "opening")
    started = time.monotonic()
    with socket.create_connection(address(limited)) as sock:
        assert read_until_closed(sock) == b""
    closed_after = time.monotonic() - started
    # Closed by the read deadline (the bridge counts it), at that deadline: not before
    # it, and well before the default one (5 s).
    assert read_timeouts(limited, "opening") - timed_out == 1
    assert READ_TIMEOUT * 0.95 <= closed_after < DEFAULT_READ_TIMEOUT


def test_a_body_that_stops_is_408_and_a_slow_steady_one_is_served(limited: EchoSystem) -> None:
    body = json.dumps({"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2}).encode()
    request = http_request("/v1/chat/completions", body)
    head, payload = request[: -len(body)], body
    # Steady: three reads half the deadline apart, 1.5 deadlines in all (longer than the
    # deadline, each read within it).
    with socket.create_connection(address(limited)) as sock:
        sock.sendall(head)
        for piece in (payload[:10], payload[10:20], payload[20:]):
            time.sleep(READ_TIMEOUT / 2)  # pacing under test: a body that comes slowly but steadily
            sock.sendall(piece)
        reply = read_response(sock)
        assert status_of(reply) == 200, reply
        assert json_of(reply)["choices"][0]["message"]["content"] == "alpha beta"
    # Stopped half way: 408.
    with socket.create_connection(address(limited)) as sock:
        sock.sendall(head + payload[:10])
        answer = read_until_closed(sock)
    assert status_of(answer) == 408
    assert json_of(answer)["error"]["code"] == "request_timeout"


def test_keep_alive_idle_connections_are_kept_as_before(limited: EchoSystem) -> None:
    # uvicorn's keep-alive timeout (5 s) still governs idle time between requests,
    # not the read deadline (2 s): the connection serves a request after 3 s idle.
    with socket.create_connection(address(limited)) as sock:
        for _ in range(2):
            sock.sendall(http_request("/health", method="GET"))
            reply = read_response(sock)
            assert status_of(reply) == 200 and reply.endswith(b'{"status":"ok"}')
            time.sleep(READ_TIMEOUT + 1)  # pacing under test: idle past the read deadline, within keep-alive


# -- the connection cap -----------------------------------------------------------------


def test_past_the_connection_cap_clients_get_503_with_retry_after(limited: EchoSystem) -> None:
    bridge = harness.bridge(limited.gateway.address, "--max-connections", "8", "--request-read-timeout", "60")
    url = f"http://{bridge.address}"
    try:
        held = [socket.create_connection(address(bridge)) for _ in range(8)]
        for sock in held:
            sock.sendall(HALF_REQUEST)
        with pytest.raises(openai.InternalServerError) as caught:
            sdk(url).chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) >= 1
        body = caught.value.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "too_many_connections" and body["error"]["type"] == "server_error"
        for sock in held:
            sock.close()
        # Below the cap again: served.
        reply = harness.wait_until(lambda: _served(url), what="a request served below the cap")
        assert reply.choices[0].message.content == "alpha beta"
        samples = harness.scrape(f"{url}/metrics")
        assert samples["tokenwire_http_connections_refused_total"] >= 1
    finally:
        bridge.stop()


def _served(url: str) -> openai.types.chat.ChatCompletion | None:
    try:
        return sdk(url).chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)
    except openai.InternalServerError:
        return None


# -- SSE keep-alives ------------------------------------------------------------------


class Recording(httpx.BaseTransport):
    """An httpx transport that keeps a copy of every response body's raw bytes."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.raw = bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        raw = self.raw
        inner = response.stream

        class Stream(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in inner:  # type: ignore[union-attr]
                    raw.extend(chunk)
                    yield chunk

            def close(self) -> None:
                inner.close()  # type: ignore[union-attr]

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Stream(), extensions=response.extensions
        )

    def close(self) -> None:
        self.inner.close()


def test_a_queued_stream_receives_keepalive_comments(limited: EchoSystem) -> None:
    holder = hold_the_slot(limited)
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    with httpx.stream("POST", f"{limited.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            lines.append((time.monotonic() - started, line))
    holder.join()
    comments = [at for at, line in lines if line == ": keep-alive"]
    data = [line for _, line in lines if line.startswith("data: ")]
    first_data = next(at for at, line in lines if line.startswith("data: "))
    # Queued for most of 2 s: several keep-alives, about one per interval, all before the first chunk.
    assert len(comments) >= 3
    assert all(at < first_data for at in comments)
    # The first once the stream was silent for an interval (the time under test): not
    # before it, and within a second more (the request's way to the worker's queue).
    assert KEEPALIVE_INTERVAL * 0.95 <= comments[0] < KEEPALIVE_INTERVAL + 1
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "alpha beta gamma alpha"


def test_a_queued_stream_that_times_out_ends_with_an_error_event(limited: EchoSystem) -> None:
    # Still queued after one interval, the stream is committed (200); the deadline passing
    # later is an in-band error, as any error after the first chunk, and the stream ends.
    holder = hold_the_slot(limited)
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "stream": True}
    headers = {**HEADERS, "X-Request-Timeout": "1"}
    with httpx.stream("POST", f"{limited.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    holder.join()
    assert lines[0] == ": keep-alive"
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "timeout" and set(error) == {"message", "type", "param", "code"}
    harness.wait_until(
        lambda: (s := harness.worker_stats(limited.chat_workers[0].address)).in_flight == 0 and s.queue_length == 0
    )


def test_the_sdk_parses_streams_with_keepalive_comments(limited: EchoSystem) -> None:
    recording = Recording()
    client = sdk(limited.url, http_client=httpx.Client(transport=recording, timeout=30))
    # Chat completions.
    holder = hold_the_slot(limited)
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=4, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    holder.join()
    assert b"\n: keep-alive\n\n" in b"\n" + bytes(recording.raw)
    assert text == "alpha beta gamma alpha"
    # Completions.
    recording.raw.clear()
    holder = hold_the_slot(limited)
    completion = client.completions.create(model=CHAT_MODEL, prompt="alpha beta gamma", max_tokens=3, stream=True)
    text = "".join(chunk.choices[0].text for chunk in completion if chunk.choices)
    holder.join()
    assert b": keep-alive\n\n" in recording.raw
    assert text == "alpha beta gamma"
    # The Responses API: the SDK's event parser, and its final response.
    recording.raw.clear()
    holder = hold_the_slot(limited)
    with client.responses.stream(model=CHAT_MODEL, input="alpha beta gamma", max_output_tokens=4) as stream_events:
        events = list(stream_events)
    holder.join()
    assert b": keep-alive\n\n" in recording.raw
    assert events[0].type == "response.created"
    assert events[-1].type == "response.incomplete"  # max_output_tokens reached
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "alpha beta gamma alpha"
    assert events[-1].response.output_text == "alpha beta gamma alpha"


def test_errors_keep_their_status_with_keepalives_on(limited: EchoSystem) -> None:
    client = sdk(limited.url)
    # Refused by the worker at once (context length): a 400, not a 200 with an error event.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "word " * (ECHO_CONTEXT * 2)}], stream=True
        )
    assert caught.value.code == "context_length_exceeded"
    # Queue full: a 429 with Retry-After, at once.
    holder = hold_the_slot(limited)
    queued = threading.Thread(
        target=lambda: list(client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True))
    )
    queued.start()
    harness.wait_until(lambda: worker_busy(limited, queued=1))
    with pytest.raises(openai.RateLimitError) as limited_error:
        client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True)
    assert int(limited_error.value.response.headers["retry-after"]) >= 1
    holder.join()
    queued.join()
