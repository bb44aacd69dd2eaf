"""A file's content is streamed from the gateway's disk, or from Redis with --store redis://...
(echo workers, real processes; each test runs on both).

The gateway here sends gRPC messages of at most 64 KiB: a file larger than that could not
come back in one message (the old bound), and comes back whole through the bridge in chunks.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import grpc
import openai
import pytest

from tests.conftest import API_KEY, EchoSystem, start_echo_system, stop_system
from tests.redis_server import RedisServer
from tokenwire.v1 import batch_pb2, batch_pb2_grpc

MESSAGE_LIMIT = 64 * 1024


@pytest.fixture(scope="module", params=["data-dir", "redis"])
def system(request: pytest.FixtureRequest) -> Iterator[EchoSystem]:
    redis = RedisServer().start() if request.param == "redis" else None
    where = ("--store", redis.url) if redis else ("--data-dir", tempfile.mkdtemp(prefix="tokenwire-files-"))
    started = start_echo_system(gateway_args=(*where, "--max-send-message-length", str(MESSAGE_LIMIT)))
    yield started
    stop_system(started)
    if redis is not None:
        redis.stop()


def test_a_file_over_the_message_limit_downloads_whole(system: EchoSystem) -> None:
    client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
    lines = [f'{{"custom_id": "r{i}", "filler": "{i:08d}{"x" * 90}"}}\n'.encode() for i in range(3000)]
    content = b"".join(lines)
    assert len(content) > 4 * MESSAGE_LIMIT
    uploaded = client.files.create(file=("big.jsonl", content), purpose="batch")
    assert client.files.content(uploaded.id).content == content
    # The one-message RPC is bound by the limit: the streamed one is what makes the download work.
    with grpc.insecure_channel(system.grpc_address) as channel:
        stub = batch_pb2_grpc.BatchServiceStub(channel)
        auth = (("authorization", f"Bearer {API_KEY}"),)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetFileContent(batch_pb2.GetFileContentRequest(file_id=uploaded.id), metadata=auth)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        chunks = list(stub.ReadFileContent(batch_pb2.ReadFileContentRequest(file_id=uploaded.id), metadata=auth))
        assert len(chunks) > 4 and b"".join(c.chunk for c in chunks) == content


def test_an_unknown_or_empty_file(system: EchoSystem) -> None:
    client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-unknown")
    empty = client.files.create(file=("empty.jsonl", b""), purpose="batch")
    assert client.files.content(empty.id).content == b""


def test_lists_page_by_limit(system: EchoSystem) -> None:
    client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
    for name in ("a.jsonl", "b.jsonl"):
        client.files.create(file=(name, b'{"custom_id": "x"}\n'), purpose="batch")
    page = client.files.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    assert len(client.batches.list(limit=1).data) <= 1
    for bad in ("abc", "-1"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.list(extra_query={"limit": bad})
        assert refused.value.body["param"] == "limit"
