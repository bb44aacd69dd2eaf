"""One request across the fleet as one trace (issue 33): real processes export OTLP/gRPC to a
receiver the test runs (tests/otlp_receiver.py); the tests check the spans and their parent links."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import openai
import pytest
from opentelemetry import trace

from common import tracing
from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, EchoSystem, start_echo_system, stop_system
from tests.engines.test_upstream_contract import fake_upstream
from tests.otlp_receiver import Receiver, Span, receiver
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

# Export every span as it ends (the SDK batches for 5 s by default): the tests wait on the spans.
EXPORT_AT_ONCE = {"OTEL_BSP_SCHEDULE_DELAY": "10"}
SECRET = "zebra-quartz-41"  # a prompt's word that no span may carry unless --trace-content
WORKER_PHASES = ["queue", "tokenize", "prefill", "decode"]


@dataclass
class Traced:
    system: EchoSystem
    spans: Receiver

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.system.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def by_environment() -> Iterator[Traced]:
    """Every part traced by the standard OTEL_EXPORTER_OTLP_ENDPOINT alone; no --trace-content."""
    with receiver() as (spans, endpoint), pytest.MonkeyPatch.context() as env:
        for name, value in {**EXPORT_AT_ONCE, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}.items():
            env.setenv(name, value)
        system = start_echo_system(tokens=4, chat_workers=1)
        try:
            yield Traced(system, spans)
        finally:
            stop_system(system)


@pytest.fixture(scope="module")
def by_flags() -> Iterator[Traced]:
    """Every part traced by --otlp-traces-endpoint, the workers with --trace-content; two chat
    workers, and a gateway that keeps a killed worker in its view (the failover test's)."""
    with receiver() as (spans, endpoint), pytest.MonkeyPatch.context() as env:
        for name, value in EXPORT_AT_ONCE.items():
            env.setenv(name, value)
        flag = ("--otlp-traces-endpoint", endpoint)
        system = start_echo_system(
            tokens=40,
            delay=0.01,
            # Least-loaded: the failover test's two choices must go to the two workers.
            gateway_args=(*flag, "--heartbeat-expiry", "120", "--routing", "least-loaded"),
            worker_args=(*flag, "--trace-content"),
            bridge_args=flag,
        )
        try:
            yield Traced(system, spans)
        finally:
            stop_system(system)


def chat_stream(traced: Traced, content: str, headers: dict[str, str], **fields: object) -> tuple[str, str]:
    """A streamed chat through the bridge: its first choice's text and finish reason."""
    stream = traced.client().chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": content}],
        stream=True,
        extra_headers=headers,
        **fields,  # type: ignore[arg-type]
    )
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices and chunk.choices[0].index == 0]
    return "".join(c.delta.content or "" for c in chunks), next(c.finish_reason for c in chunks if c.finish_reason)


def one(spans: list[Span], service: str, kind: str, name: str | None = None) -> Span:
    found = [s for s in spans if s.service == service and s.kind == kind and name in (None, s.name)]
    assert len(found) == 1, (service, kind, name, [(s.service, s.kind, s.name) for s in spans])
    return found[0]


def named(spans: list[Span], name: str) -> list[Span]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start)


def whole_trace(
    spans: Receiver, trace_id: str, entry: str = "POST /v1/chat/completions", workers: int = 1
) -> list[Span]:
    """The trace's spans once they are all in: its entry span, every worker's phases, and every
    other span's parent (each part exports its spans as they end, and the parts' exports arrive
    in any order; a part's spans arrive in the order they ended)."""

    def complete(received: list[Span]) -> list[Span] | None:
        mine = [s for s in received if s.trace_id == trace_id]
        ids = {s.span_id for s in mine}
        orphans = [s for s in mine if s.parent_id not in ids]
        whole = len(orphans) == 1 and orphans[0].name == entry and len(named(mine, "decode")) >= workers
        return mine if whole else None

    return spans.wait_for(complete, f"the spans of trace {trace_id}")


def trace_of_request(spans: Receiver, request_id: str) -> str:
    def found(received: list[Span]) -> str | None:
        return next((s.trace_id for s in received if s.attributes.get(tracing.REQUEST_ID) == request_id), None)

    return spans.wait_for(found, f"a span of request {request_id}")


def children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start)


def hops(spans: list[Span], rpc: str, worker_rpc: str) -> tuple[Span, Span, Span, Span, Span]:
    """A request's spans from the bridge to the worker, each hop's server and client side, after
    asserting that each is the child of the one before: the bridge's HTTP span, its call to the
    gateway, the gateway's call span, its call to the worker (``dispatch``), the worker's call span."""
    http = one(spans, "tokenwire-bridge", "server", "POST /v1/chat/completions")
    call = one(spans, "tokenwire-bridge", "client", f"tokenwire.v1.InferenceService/{rpc}")
    gateway = one(spans, "tokenwire-gateway", "server", f"tokenwire.v1.InferenceService/{rpc}")
    dispatch = one(spans, "tokenwire-gateway", "client", "dispatch")
    worker = one(spans, "tokenwire-worker", "server", f"tokenwire.v1.WorkerService/{worker_rpc}")
    assert call.parent_id == http.span_id
    # The traceparent the bridge sent is its client span's.
    assert gateway.parent_id == call.span_id
    assert dispatch.parent_id == gateway.span_id
    assert worker.parent_id == dispatch.span_id
    return http, call, gateway, dispatch, worker


def assert_bridge_call(call: Span, rpc: str, gateway_address: str, code: grpc.StatusCode) -> None:
    """The bridge's client span by OpenTelemetry's RPC names, with the call's status."""
    host, port = gateway_address.rsplit(":", 1)
    assert call.attributes["rpc.system"] == "grpc"
    assert call.attributes["rpc.service"] == "tokenwire.v1.InferenceService"
    assert call.attributes["rpc.method"] == rpc
    assert (call.attributes["server.address"], call.attributes["server.port"]) == (host, int(port))
    assert call.attributes["rpc.grpc.status_code"] == code.value[0]
    assert call.error == (code != grpc.StatusCode.OK)


def test_a_streamed_chat_is_one_trace_from_the_bridge_through_the_gateway_to_the_worker(
    by_environment: Traced,
) -> None:
    text, finish = chat_stream(by_environment, f"hello {SECRET}", {"X-Request-Id": "trace-one-chat"})
    assert text
    spans = whole_trace(by_environment.spans, trace_of_request(by_environment.spans, "trace-one-chat"))

    http, call, gateway, dispatch, worker = hops(spans, "StreamChatCompletion", "Generate")
    admission = one(spans, "tokenwire-gateway", "internal", "admission")
    # No traceparent came: the bridge started the trace, and each hop is the child of the one before.
    assert http.parent_id == ""
    assert admission.parent_id == gateway.span_id
    assert_bridge_call(call, "StreamChatCompletion", by_environment.system.grpc_address, grpc.StatusCode.OK)
    # The client span lasts the whole stream: it ends after the gateway's, within the HTTP request's.
    assert http.start <= call.start <= gateway.start and gateway.end <= call.end <= http.end
    assert worker.parent_id == dispatch.span_id
    phases = children(spans, worker)
    assert [s.name for s in phases] == WORKER_PHASES
    assert all(before.end <= after.start for before, after in itertools.pairwise(phases))
    assert not any(s.error for s in spans)

    # The request id, as the client gave it, on each part's span of the request.
    assert {s.attributes[tracing.REQUEST_ID] for s in (http, gateway, worker)} == {"trace-one-chat"}
    # What the request was and what it cost, by OpenTelemetry's GenAI names.
    usage = (gateway.attributes["gen_ai.usage.input_tokens"], gateway.attributes["gen_ai.usage.output_tokens"])
    assert gateway.attributes["gen_ai.operation.name"] == "chat"
    assert gateway.attributes["gen_ai.request.model"] == CHAT_MODEL == worker.attributes["gen_ai.request.model"]
    assert usage == (worker.attributes["gen_ai.usage.input_tokens"], worker.attributes["gen_ai.usage.output_tokens"])
    assert usage[1] == 4 == phases[3].attributes["gen_ai.usage.output_tokens"]
    assert phases[2].attributes["gen_ai.usage.input_tokens"] == usage[0]
    assert worker.attributes["gen_ai.response.finish_reasons"] == [finish]
    assert dispatch.attributes["server.address"] == by_environment.system.chat_workers[0].address
    assert dispatch.attributes["tokenwire.dispatch.attempt"] == 1
    assert http.attributes["http.response.status_code"] == 200
    # A stream is counted, not a span a token.
    assert len(spans) == 10
    # The prompt is nowhere without --trace-content.
    assert not [s.name for s in spans if SECRET in s.text()]


def test_a_non_streamed_chat_is_one_trace_from_the_bridge_through_the_gateway_to_the_worker(
    by_environment: Traced,
) -> None:
    reply = by_environment.client().chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hello"}], extra_headers={"X-Request-Id": "trace-unary"}
    )
    assert reply.choices[0].message.content
    spans = whole_trace(by_environment.spans, trace_of_request(by_environment.spans, "trace-unary"))
    http, call, gateway, _, worker = hops(spans, "CreateChatCompletion", "GenerateChoice")
    assert http.parent_id == ""
    assert {s.attributes[tracing.REQUEST_ID] for s in (http, gateway, worker)} == {"trace-unary"}
    assert_bridge_call(call, "CreateChatCompletion", by_environment.system.grpc_address, grpc.StatusCode.OK)
    assert [s.name for s in children(spans, worker)] == WORKER_PHASES
    assert not any(s.error for s in spans)
    assert len(spans) == 10


def test_a_conversations_next_turn_says_it_was_routed_by_its_prefix_and_how_long_a_one(
    by_environment: Traced,
) -> None:
    """Cache-aware routing (the default): the first turn goes by its anchor, the next by the
    prefix the index holds, and the dispatch span says how many tokens it expected held."""
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You answer questions about the weather. " * 3},
        {"role": "user", "content": "Will it rain in Lyon today?"},
    ]
    dispatched = []
    for turn in ("trace-turn-1", "trace-turn-2"):
        reply = by_environment.client().chat.completions.create(
            model=CHAT_MODEL,
            messages=messages,  # type: ignore[arg-type]
            extra_headers={"X-Request-Id": turn},
        )
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content or ""},
            {"role": "user", "content": "And tomorrow?"},
        ]
        spans = whole_trace(by_environment.spans, trace_of_request(by_environment.spans, turn))
        dispatched.append(one(spans, "tokenwire-gateway", "client", "dispatch").attributes)
    first, second = dispatched
    assert (first["tokenwire.dispatch.reason"], first["tokenwire.dispatch.prefix_tokens"]) == ("anchor", 0)
    assert second["tokenwire.dispatch.reason"] == "prefix"
    # At least the system prompt (21 words) was expected in the worker's cache.
    assert second["tokenwire.dispatch.prefix_tokens"] >= 10


def test_an_incoming_traceparent_is_continued_over_http_and_over_grpc(by_environment: Traced) -> None:
    http_trace, grpc_trace, caller = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "0af7651916cd43dd8448eb211c80319c",
        "00f067aa0ba902b7",
    )
    chat_stream(by_environment, "hello", {"traceparent": f"00-{http_trace}-{caller}-01"})
    spans = whole_trace(by_environment.spans, http_trace)
    assert one(spans, "tokenwire-bridge", "server").parent_id == caller
    assert one(spans, "tokenwire-worker", "server").trace_id == http_trace

    async def grpc_call() -> None:
        async with grpc.aio.insecure_channel(by_environment.system.grpc_address) as channel:
            stub = api_pb2_grpc.InferenceServiceStub(channel)
            request = api_pb2.CreateChatCompletionRequest(
                model=CHAT_MODEL, messages=[common_pb2.ChatMessage(role="user", content="hello")]
            )
            metadata = (("authorization", f"Bearer {API_KEY}"), ("traceparent", f"00-{grpc_trace}-{caller}-01"))
            await stub.CreateChatCompletion(request, metadata=metadata, timeout=15)

    asyncio.run(grpc_call())
    spans = whole_trace(by_environment.spans, grpc_trace, "tokenwire.v1.InferenceService/CreateChatCompletion")
    gateway = one(spans, "tokenwire-gateway", "server", "tokenwire.v1.InferenceService/CreateChatCompletion")
    assert gateway.parent_id == caller
    worker = one(spans, "tokenwire-worker", "server", "tokenwire.v1.WorkerService/GenerateChoice")
    assert [s.name for s in children(spans, worker)] == WORKER_PHASES


def test_a_request_the_keys_refuse_is_traced_with_its_reason(by_environment: Traced) -> None:
    client = openai.OpenAI(base_url=f"{by_environment.system.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-Id": "refused"}
        )
    trace_id = trace_of_request(by_environment.spans, "refused")
    spans = harness.wait_until(
        lambda: len(found := by_environment.spans.trace(trace_id)) == 3 and found, what="the refused request's spans"
    )
    http = one(spans, "tokenwire-bridge", "server")
    call = one(spans, "tokenwire-bridge", "client", "tokenwire.v1.InferenceService/CreateChatCompletion")
    gateway = one(spans, "tokenwire-gateway", "server", "tokenwire.v1.InferenceService/CreateChatCompletion")
    assert call.parent_id == http.span_id and gateway.parent_id == call.span_id
    assert gateway.attributes[tracing.REQUEST_ID] == "refused"
    assert gateway.attributes["error.type"] == "invalid_api_key"
    assert gateway.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert http.attributes["http.response.status_code"] == 401
    # The client's mistake, not the server's failure; the bridge's call failed, by OpenTelemetry's
    # rule for a client span (every status but OK).
    assert not gateway.error and not http.error
    assert_bridge_call(
        call, "CreateChatCompletion", by_environment.system.grpc_address, grpc.StatusCode.UNAUTHENTICATED
    )


def test_prompt_and_completion_text_are_recorded_only_with_trace_content(by_flags: Traced) -> None:
    text, finish = chat_stream(by_flags, f"hello {SECRET}", {"X-Request-Id": "trace-content"})
    spans = whole_trace(by_flags.spans, trace_of_request(by_flags.spans, "trace-content"))
    worker = one(spans, "tokenwire-worker", "server")
    assert json.loads(worker.attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": f"hello {SECRET}"}]}
    ]
    (output,) = json.loads(worker.attributes["gen_ai.output.messages"])
    assert output["parts"][0]["content"] == text and output["finish_reason"] == finish
    # Only the worker records it (the bridge and the gateway were not asked to).
    assert [s.service for s in spans if SECRET in s.text()] == ["tokenwire-worker"]


def test_a_client_that_leaves_mid_stream_stops_the_worker_and_its_spans_say_so(by_flags: Traced) -> None:
    marks = {worker.address: worker.log_mark() for worker in by_flags.system.chat_workers}
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "long story"}], "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "trace-cancel"}
    with httpx.Client(base_url=by_flags.system.url, headers=headers) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            lines = reply.iter_lines()
            for _ in range(6):
                next(lines)
        # Leaving the block closes the connection mid-stream.
    spans = whole_trace(by_flags.spans, trace_of_request(by_flags.spans, "trace-cancel"))
    (dispatch,) = named(spans, "dispatch")
    worker = next(w for w in by_flags.system.chat_workers if w.address == dispatch.attributes["server.address"])
    assert all(n <= 1 for n in harness.after_cancel(worker, marks[worker.address], 1))
    (decode,) = named(spans, "decode")
    assert decode.error and decode.attributes["error.type"] == "cancelled"
    assert one(spans, "tokenwire-gateway", "server").attributes["error.type"] == "cancelled"
    assert one(spans, "tokenwire-bridge", "server").error  # the client left before the end
    # The bridge cancelled its call to the gateway, and its client span ended with it.
    call = one(spans, "tokenwire-bridge", "client")
    assert_bridge_call(call, "StreamChatCompletion", by_flags.system.grpc_address, grpc.StatusCode.CANCELLED)


def test_a_failover_shows_both_attempts(by_flags: Traced) -> None:
    dead = by_flags.system.chat_workers[0]
    # Stopped, not killed: a killed worker's connection is reset, and the gateway takes it out of
    # dispatch before any call. A stopped one keeps its connection until keepalive gives it up
    # (within 12 s), so the call sent to it fails then (UNAVAILABLE) and moves to the live worker.
    dead.signal(signal.SIGSTOP)
    try:
        # Two choices: each goes to another worker (the first's call holds its worker's load), so
        # one of them meets the stopped worker, and fails over to the live one.
        chat_stream(by_flags, "hello", {"X-Request-Id": "trace-failover"}, n=2)
        spans = whole_trace(by_flags.spans, trace_of_request(by_flags.spans, "trace-failover"), workers=2)
    finally:
        dead.signal(signal.SIGKILL)  # never to answer the call it was sent

    gateway = one(spans, "tokenwire-gateway", "server")
    attempts = named(spans, "dispatch")
    assert len(attempts) == 3 and all(a.parent_id == gateway.span_id for a in attempts)
    (failed,) = [a for a in attempts if a.error]
    assert failed.attributes["server.address"] == dead.address
    assert failed.attributes["error.type"] == "UNAVAILABLE"
    assert failed.attributes["tokenwire.dispatch.attempt"] == 1
    (retried,) = [
        a
        for a in attempts
        if a.attributes["tokenwire.choice.index"] == failed.attributes["tokenwire.choice.index"] and a is not failed
    ]
    assert retried.attributes["tokenwire.dispatch.attempt"] == 2 and not retried.error
    assert retried.attributes["server.address"] == by_flags.system.chat_workers[1].address
    assert retried.start >= failed.end
    # The live worker served both choices, each under its attempt; the dead one nothing.
    assert [len(children(spans, a)) for a in attempts] == [0 if a is failed else 1 for a in attempts]
    served = [s for s in spans if s.service == "tokenwire-worker" and s.kind == "server"]
    assert len(served) == 2 and not any(s.error for s in served)
    assert not gateway.error


def test_the_openai_engine_carries_the_trace_to_its_upstream() -> None:
    caller_trace, caller = "5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8"
    with receiver() as (spans, endpoint), fake_upstream() as upstream, pytest.MonkeyPatch.context() as env:
        for name, value in EXPORT_AT_ONCE.items():
            env.setenv(name, value)
        flag = ("--otlp-traces-endpoint", endpoint)
        gateway = harness.gateway(*flag)
        worker = harness.worker(
            gateway.address, "--engine", "openai", "--model-name", "fronted", "--upstream-url", upstream,
            "--upstream-model", "fake", *flag,
        )  # fmt: skip
        try:
            with grpc.insecure_channel(gateway.address) as channel:
                stub = api_pb2_grpc.InferenceServiceStub(channel)
                harness.wait_until(
                    lambda: any(
                        m.id == "fronted" for m in stub.ListModels(api_pb2.ListModelsRequest(), timeout=5).data
                    ),
                    what="the openai worker registered",
                )
                request = api_pb2.CreateChatCompletionRequest(
                    model="fronted", messages=[common_pb2.ChatMessage(role="user", content="hello")]
                )
                metadata = (("traceparent", f"00-{caller_trace}-{caller}-01"),)
                chunks = stub.StreamChatCompletion(
                    api_pb2.StreamChatCompletionRequest(request=request), metadata=metadata
                )
                assert [c for c in chunks if c.choices and c.choices[0].delta.content]
            seen = httpx.get(upstream.removesuffix("/v1") + "/_traceparents", timeout=5).json()
            version, trace_id, parent, flags = seen[-1].split("-")
            assert (version, trace_id, flags) == ("00", caller_trace, "01")
            trace = whole_trace(spans, caller_trace, "tokenwire.v1.InferenceService/StreamChatCompletion")
            # The upstream's parent is the worker's HTTP call, within the worker's Generate call.
            (upstream_call,) = [s for s in trace if s.span_id == parent]
            assert (upstream_call.service, upstream_call.kind, upstream_call.name) == (
                "tokenwire-worker",
                "client",
                "POST",
            )
            assert upstream_call.attributes["http.url"] == f"{upstream}/chat/completions"
            assert upstream_call.parent_id == one(trace, "tokenwire-worker", "server").span_id
            assert one(trace, "tokenwire-gateway", "server").parent_id == caller
        finally:
            worker.stop()
            gateway.stop()


def test_serve_traces_each_of_its_parts_as_a_service_of_its_own() -> None:
    """serve hands --otlp-traces-endpoint to its parts; its gateway and bridge share one process
    (the front end) and still report as two services."""
    with receiver() as (spans, endpoint):
        serve = harness.Serve(
            ["--echo", "--no-embeddings", "--otlp-traces-endpoint", endpoint], env=EXPORT_AT_ONCE
        ).start(timeout=120)
        try:
            client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="none", max_retries=0)
            client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-Id": "served"}
            )
            trace = whole_trace(spans, trace_of_request(spans, "served"))
            hops(trace, "CreateChatCompletion", "GenerateChoice")
        finally:
            assert serve.stop() == 0


def test_off_by_default_and_the_standard_switches() -> None:
    assert tracing.endpoint(None, {}) is None
    assert tracing.endpoint("http://c:4317", {}) == "http://c:4317"
    assert tracing.endpoint(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == "http://c:4317"
    traces_first = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317",
    }
    assert tracing.endpoint(None, traces_first) == "http://t:4317"
    assert tracing.endpoint("http://c:4317", {"OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.endpoint("http://c:4317", {"OTEL_TRACES_EXPORTER": "none"}) is None
    off = tracing.configure("a part never turned on", None, True, environ={})
    assert not off.on and off.start_span("admission") is trace.INVALID_SPAN
    assert tracing.call_metadata() == ()  # nothing of this process traces: calls carry no trace context
    assert off.channel_interceptors("127.0.0.1:50051") == []  # nor does a channel get an interceptor


@pytest.mark.parametrize(
    ("variable", "value"), [("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"), ("OTEL_TRACES_EXPORTER", "zipkin")]
)
def test_a_setting_tokenwire_cannot_honour_stops_it_at_start(variable: str, value: str) -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "tokenwire_cli", "gateway", "--port", "0"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"{variable}={value}" in done.stderr


@pytest.mark.models
def test_a_real_engines_cached_prompt_tokens_are_on_the_workers_span() -> None:
    """llama.cpp's second turn reuses the first's prompt: the worker's call span says how many
    prompt tokens came from its cache, as the response's usage does."""
    model = "smollm2-135m-instruct"
    with receiver() as (spans, endpoint), pytest.MonkeyPatch.context() as env:
        for name, value in {**EXPORT_AT_ONCE, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}.items():
            env.setenv(name, value)
        gateway = harness.gateway()
        worker = harness.worker(gateway.address, "--engine", "llama_cpp", "--n-ctx", "2048", "--parallel", "1")
        bridge = harness.bridge(gateway.address)
        try:
            harness.wait_for_workers(f"http://{bridge.address}", model, 1)
            client = openai.OpenAI(base_url=f"http://{bridge.address}/v1", api_key="none", max_retries=0, timeout=300)
            messages = [
                {"role": "system", "content": "You are a gardening assistant for people who live by rivers. " * 6},
                {"role": "user", "content": "What grows well in wet soil?"},
            ]
            for turn in ("cached-1", "cached-2"):
                reply = client.chat.completions.create(
                    model=model,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=8,
                    temperature=0,
                    extra_headers={"X-Request-Id": turn},
                )
                messages += [
                    {"role": "assistant", "content": reply.choices[0].message.content or ""},
                    {"role": "user", "content": "And in dry soil?"},
                ]
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            cached = reply.usage.prompt_tokens_details.cached_tokens
            assert cached and cached > 0  # the system prompt and the first turn, at least
            trace_id = trace_of_request(spans, "cached-2")
            call = one(whole_trace(spans, trace_id), "tokenwire-worker", "server")
            assert call.attributes["gen_ai.usage.cache_read.input_tokens"] == cached
            assert call.attributes["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
        finally:
            for proc in (bridge, worker, gateway):
                proc.stop()
