"""The Responses API's protocol through the bridge, with the official SDK, on
echo workers: the store (LRU by count and bytes, per key, 404s), the stream's
event grammar and its in-band errors, and the 400s for what is not served.
Model behaviour (text, JSON schemas, tool calls) is tested on the real model
in test_responses_models.py."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from rest_bridge.responses.store import ResponseStore
from tests.conftest import API_KEY, CHAT_MODEL, EchoSystem, start_echo_system, stop_system
from tests.test_cancellation import leave_while_waiting, one_cancel, settled

OTHER_KEY = "test-key-2"


@pytest.fixture(scope="module")
def system() -> Iterator[EchoSystem]:
    """Two keys, one chat worker, and a store of two responses."""
    system = start_echo_system(
        keys=f"{API_KEY},{OTHER_KEY}", chat_workers=1, bridge_args=("--responses-store-size", "2")
    )
    yield system
    stop_system(system)


@pytest.fixture(scope="module")
def client(system: EchoSystem) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)


def test_create_retrieve_delete(client: openai.OpenAI) -> None:
    created = client.responses.create(model=CHAT_MODEL, input="alpha beta", metadata={"job": "7"})
    assert created.object == "response" and created.id.startswith("resp_")
    assert created.status == "completed" and created.output_text == " ".join(["alpha", "beta"] * 8)
    assert created.metadata == {"job": "7"} and created.store is True
    assert created.usage.total_tokens == created.usage.input_tokens + created.usage.output_tokens
    assert created.usage.output_tokens == 16
    again = client.responses.retrieve(created.id)
    assert again.model_dump() == created.model_dump()
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(created.id)
    assert caught.value.code == "response_not_found" and created.id in caught.value.message


def test_input_items(client: openai.OpenAI) -> None:
    call = {"type": "function_call", "call_id": "call_9", "name": "lookup", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "call_9", "output": "found"}
    reply = client.responses.create(
        model=CHAT_MODEL,
        input=[{"role": "user", "content": "find it"}, call, output, {"role": "user", "content": "ok"}],
    )
    items = list(client.responses.input_items.list(reply.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "function_call_output", "message"]
    assert items[0].content[0].type == "input_text" and items[0].content[0].text == "find it"
    assert items[1].call_id == "call_9" and items[2].output == "found"
    assert len({i.id for i in items}) == 4
    newest_first = client.responses.input_items.list(reply.id, limit=3)
    assert [i.id for i in newest_first.data] == [i.id for i in items[::-1][:3]] and newest_first.has_more
    every = [i.id for i in client.responses.input_items.list(reply.id, limit=3)]  # the SDK pages with `after`
    assert every == [i.id for i in items[::-1]]
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(reply.id, limit=10**6)


def test_evicted_id_is_404(client: openai.OpenAI) -> None:
    """The store keeps two responses here: the oldest one goes, in LRU order."""
    first, second = (client.responses.create(model=CHAT_MODEL, input=w) for w in ("one", "two"))
    client.responses.retrieve(first.id)  # now the most recently used
    third = client.responses.create(model=CHAT_MODEL, input="three")
    assert client.responses.retrieve(first.id).id == first.id
    assert client.responses.retrieve(third.id).id == third.id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=CHAT_MODEL, input="more", previous_response_id=second.id)
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.body["param"] == "previous_response_id"


def test_previous_response_id_replays_the_conversation(client: openai.OpenAI) -> None:
    """The echo "template" is one word per token: the prompt counts show what was sent."""
    first = client.responses.create(model=CHAT_MODEL, input="red green", instructions="be brief", max_output_tokens=3)
    # system: be brief / user: red green  -> 6 words
    assert first.usage.input_tokens == 6 and first.instructions == "be brief"
    second = client.responses.create(model=CHAT_MODEL, input="blue", previous_response_id=first.id)
    # Instructions are not carried over; the user turn, the answer (3 words) and the new turn are.
    assert second.usage.input_tokens == len("user: red green assistant: red green red user: blue".split())
    assert second.previous_response_id == first.id
    assert second.output_text.split()[0] == "blue"


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=CHAT_MODEL, input="x", store=False)
    assert reply.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)


def test_another_keys_response_is_404(client: openai.OpenAI, system: EchoSystem) -> None:
    mine = client.responses.create(model=CHAT_MODEL, input="secret")
    other = openai.OpenAI(base_url=f"{system.url}/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=CHAT_MODEL, input="x", previous_response_id=mine.id)
    assert client.responses.retrieve(mine.id).id == mine.id


@pytest.mark.parametrize("key", [None, "wrong"])
def test_store_routes_need_the_key(system: EchoSystem, key: str | None) -> None:
    """No key or a wrong one is a 401 (with its own message), not a 404."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for method, path in (("GET", "/v1/responses/resp_x"), ("DELETE", "/v1/responses/resp_x")):
        reply = httpx.request(method, f"{system.url}{path}", headers=headers)
        assert reply.status_code == 401, reply.text
        assert reply.json()["error"]["code"] == "invalid_api_key"
    body = {"model": CHAT_MODEL, "input": "x", "previous_response_id": "resp_x"}
    reply = httpx.post(f"{system.url}/v1/responses", json=body, headers=headers)
    assert reply.status_code == 401


def test_stream_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model=CHAT_MODEL, input="a b c") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == " ".join((["a", "b", "c"] * 6)[:16])
    assert final.status == "completed" and final.usage.output_tokens == 16
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_stream_incomplete(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=CHAT_MODEL, input="a b", max_output_tokens=3, stream=True))
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete" and last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == "a b a"
    assert last.response.output[0].status == "incomplete"


def test_unary_incomplete(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=CHAT_MODEL, input="a b", max_output_tokens=3)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"


def test_stream_error_mid_stream_ends_cleanly() -> None:
    """A deadline that passes mid-stream: an error event, response.failed, and the end."""
    system = start_echo_system(delay=0.05, tokens=200, chat_workers=1)
    try:
        reply = httpx.post(
            f"{system.url}/v1/responses",
            json={"model": CHAT_MODEL, "input": "slow words", "stream": True},
            headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Timeout": "0.6"},
            timeout=30,
        )
        assert reply.status_code == 200
        names = [line.removeprefix("event: ") for line in reply.text.splitlines() if line.startswith("event: ")]
        assert names[:2] == ["response.created", "response.in_progress"]
        assert "response.output_text.delta" in names
        assert names[-2:] == ["error", "response.failed"]
        assert "[DONE]" not in reply.text
    finally:
        stop_system(system)


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_stops_the_worker(slow_system: EchoSystem, stream: bool) -> None:
    """A Responses client that leaves (mid-stream, or while waiting) frees the worker's slot."""
    before = settled(slow_system)
    body = {"model": CHAT_MODEL, "input": "long story", "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if stream:
        with httpx.Client(base_url=slow_system.url, headers=headers) as client:
            with client.stream("POST", "/v1/responses", json=body) as reply:
                lines = reply.iter_lines()
                while "response.output_text.delta" not in next(lines):
                    pass
    else:
        leave_while_waiting(slow_system, "/v1/responses", body)
    assert one_cancel(slow_system, before) <= 1


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "file_search"),
        ({"tools": [{"type": "computer_use_preview", "display_width": 1, "display_height": 1}]}, "computer_use"),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "reasoning"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        ({"tool_choice": {"type": "web_search_preview"}}, "web_search_preview"),
        ({"text": {"format": {"type": "grammar"}}}, "grammar"),
        ({"background": True}, "background"),
    ],
)
def test_unsupported_is_400_naming_it(client: openai.OpenAI, extra: dict, named: str) -> None:
    request = {"model": CHAT_MODEL, "input": "x", **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**request)
    assert named in caught.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": CHAT_MODEL}, "input"),
        ({"model": CHAT_MODEL, "input": 5}, "input"),
        ({"model": CHAT_MODEL, "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": CHAT_MODEL, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"model": CHAT_MODEL, "input": "x", "metadata": {"k": 1}}, "metadata"),
        ({"model": CHAT_MODEL, "input": "x", "store": "yes"}, "store"),
        ({"model": CHAT_MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_bad_requests_are_400(system: EchoSystem, body: dict, param: str) -> None:
    reply = httpx.post(f"{system.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_store_bounds_count_and_bytes() -> None:
    store = ResponseStore(max_count=3, max_bytes=2000)
    owner = b"k"

    def put(i: int, size: int) -> None:
        store.put(owner, {"id": f"r{i}"}, [{"content": "x" * size}])

    for i in range(4):
        put(i, 10)
    assert len(store) == 3 and store.get("r0", owner) is None  # count bound
    put(4, 1500)  # bytes bound: the older ones make room
    assert store.get("r4", owner) is not None and store.bytes <= 2000
    assert store.get("r1", owner) is None
    put(5, 5000)  # larger than the whole store: not kept, nothing evicted for it
    assert store.get("r5", owner) is None and store.get("r4", owner) is not None
    assert store.get("r4", b"someone else") is None
    assert store.delete("r4", owner) and not store.delete("r4", owner)
