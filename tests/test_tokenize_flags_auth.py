"""Tokenize/detokenize over REST and gRPC (behind the keys), FastChat's JSON-list
CORS flags through a real browser preflight, and OpenAI's two 401 messages.
On echo workers: the protocol, not a model (the real tokenizers are tested in
test_responses_models.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import httpx
import openai
import pytest

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, ECHO_CONTEXT, EMBED_MODEL, EchoSystem
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc

AUTH = {"Authorization": f"Bearer {API_KEY}"}
NO_KEY = "You didn't provide an API key"
WRONG_KEY = "Incorrect API key provided"


@pytest.mark.parametrize("model", [CHAT_MODEL, EMBED_MODEL])
def test_tokenize_and_detokenize_rest(echo_system: EchoSystem, model: str) -> None:
    reply = httpx.post(f"{echo_system.url}/tokenize", json={"model": model, "prompt": "one two three"}, headers=AUTH)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"tokens", "count", "max_model_len"} and body["count"] == len(body["tokens"]) == 3
    back = httpx.post(f"{echo_system.url}/detokenize", json={"model": model, "tokens": body["tokens"]}, headers=AUTH)
    assert back.status_code == 200 and set(back.json()) == {"prompt"}


def test_tokenize_messages_counts_the_template(echo_system: EchoSystem) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    reply = httpx.post(f"{echo_system.url}/tokenize", json={"model": CHAT_MODEL, "messages": messages}, headers=AUTH)
    assert reply.json()["count"] == 6 and reply.json()["max_model_len"] == ECHO_CONTEXT  # "system: be brief" ...


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"model": CHAT_MODEL}, "prompt"),
        ("/tokenize", {"model": CHAT_MODEL, "prompt": "a", "messages": []}, "prompt"),
        ("/tokenize", {"model": CHAT_MODEL, "prompt": 5}, "prompt"),
        ("/tokenize", {"model": CHAT_MODEL, "messages": []}, "messages"),
        ("/tokenize", {"prompt": "a"}, "model"),
        ("/detokenize", {"model": CHAT_MODEL, "tokens": "a b"}, "tokens"),
        ("/detokenize", {"model": CHAT_MODEL, "tokens": [-1]}, "tokens"),
        ("/detokenize", {"model": CHAT_MODEL, "tokens": [2**40]}, "tokens"),
    ],
)
def test_tokenize_bad_input_is_400(echo_system: EchoSystem, path: str, body: dict, param: str) -> None:
    reply = httpx.post(f"{echo_system.url}{path}", json=body, headers=AUTH)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_unknown_model_tokenize_is_404(echo_system: EchoSystem) -> None:
    reply = httpx.post(f"{echo_system.url}/tokenize", json={"model": "nope", "prompt": "a"}, headers=AUTH)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(("headers", "message"), [({}, NO_KEY), ({"Authorization": "Bearer wrong"}, WRONG_KEY)])
@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenize_needs_the_key(echo_system: EchoSystem, path: str, headers: dict, message: str) -> None:
    body = {"model": CHAT_MODEL, "prompt": "a", "tokens": [1]}
    reply = httpx.post(f"{echo_system.url}{path}", json=body, headers=headers)
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["code"] == "invalid_api_key" and error["message"].startswith(message)


def test_no_key_and_wrong_key_messages_sdk(echo_system: EchoSystem) -> None:
    """OpenAI's wording: a missing key is not called incorrect; both are 401 invalid_api_key."""
    client = openai.OpenAI(base_url=f"{echo_system.url}/v1", api_key="sk-wrong", max_retries=0)
    # The SDK insists on a key; omitting its header is how a client without one calls.
    for headers, message in (({"Authorization": openai.omit}, NO_KEY), ({}, WRONG_KEY)):
        for call in (
            lambda h: client.models.list(extra_headers=h),
            lambda h: client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], extra_headers=h
            ),
            lambda h: client.responses.create(model=CHAT_MODEL, input="x", extra_headers=h),
        ):
            with pytest.raises(openai.AuthenticationError) as caught:
                call(headers)
            assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
            assert caught.value.body["message"].startswith(message), caught.value.body


def test_grpc_tokenize_detokenize(echo_system: EchoSystem) -> None:
    """The matching RPCs: on the gateway (behind the key) and on a worker."""
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    with grpc.insecure_channel(echo_system.grpc_address) as channel:
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        counted = stub.Tokenize(api_pb2.TokenizeRequest(model=CHAT_MODEL, prompt="a b c"), metadata=metadata)
        assert counted.count == 3 and len(counted.tokens) == 3 and counted.max_model_len == ECHO_CONTEXT
        chat = api_pb2.TokenizeRequest(
            model=CHAT_MODEL,
            messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="x y")]),
        )
        assert stub.Tokenize(chat, metadata=metadata).count == 3
        text = stub.Detokenize(api_pb2.DetokenizeRequest(model=CHAT_MODEL, tokens=[7, 8]), metadata=metadata)
        assert text.prompt == "7 8"
        with pytest.raises(grpc.RpcError) as caught:
            stub.Tokenize(api_pb2.TokenizeRequest(model=CHAT_MODEL, prompt="a"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(echo_system.chat_workers[0].address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        ids = worker.Tokenize(worker_pb2.WorkerServiceTokenizeRequest(prompt="a b")).token_ids
        assert len(ids) == 2
        assert worker.Detokenize(worker_pb2.WorkerServiceDetokenizeRequest(token_ids=ids)).text == " ".join(
            map(str, ids)
        )


# -- FastChat's flag forms -------------------------------------------------------------


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        f"{url}/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_fastchat_json_list_cors_flags_pass_a_preflight(echo_system: EchoSystem) -> None:
    bridge = harness.bridge(
        echo_system.grpc_address,
        "--allowed-origins",
        '["http://app.example", "http://other.example"]',
        "--allowed-methods",
        '["GET", "POST"]',
        "--allowed-headers",
        '["*"]',
    )
    try:
        url = f"http://{bridge.address}"
        reply = preflight(url, "http://app.example")
        assert reply.status_code == 200, reply.text
        assert reply.headers["access-control-allow-origin"] == "http://app.example"
        assert set(reply.headers["access-control-allow-methods"].replace(" ", "").split(",")) >= {"GET", "POST"}
        assert "[" not in reply.headers["access-control-allow-methods"]
        assert "authorization" in reply.headers["access-control-allow-headers"].lower()
        assert preflight(url, "http://evil.example").status_code == 400
        # And a real cross-origin call gets the header back.
        call = httpx.get(f"{url}/v1/models", headers={**AUTH, "Origin": "http://other.example"})
        assert call.status_code == 200 and call.headers["access-control-allow-origin"] == "http://other.example"
    finally:
        bridge.stop()


def test_comma_form_still_works(echo_system: EchoSystem) -> None:
    bridge = harness.bridge(echo_system.grpc_address, "--allowed-origins", "http://a.example, http://b.example")
    try:
        reply = preflight(f"http://{bridge.address}", "http://b.example")
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "http://b.example"
    finally:
        bridge.stop()


@pytest.mark.parametrize("command", ["bridge", "serve"])
@pytest.mark.parametrize(
    ("flag", "value"),
    [("--allowed-origins", '["*"'), ("--allowed-methods", '{"GET": 1}'), ("--allowed-headers", "[1, 2]")],
)
def test_malformed_list_flag_is_a_startup_error(command: str, flag: str, value: str) -> None:
    extra = ["--echo"] if command == "serve" else []
    result = subprocess.run(
        [sys.executable, "-m", "tokenwire_cli", command, "--port", "0", *extra, flag, value],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert flag in result.stderr and "JSON list" in result.stderr
    assert "starting" not in result.stdout  # refused before starting anything


def test_fastchat_url_form_of_the_controller_address(echo_system: EchoSystem) -> None:
    """FastChat writes --controller-address http://host:port; it reaches the same gateway."""
    bridge = harness.bridge("127.0.0.1:1", "--controller-address", f"http://{echo_system.grpc_address}/")
    try:
        reply = httpx.get(f"http://{bridge.address}/v1/models", headers=AUTH)
        assert reply.status_code == 200 and CHAT_MODEL in {m["id"] for m in reply.json()["data"]}
    finally:
        bridge.stop()
