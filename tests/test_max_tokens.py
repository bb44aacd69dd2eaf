"""An unset max_tokens stays unset down to the engine (no sentinel number)."""

from __future__ import annotations

import pytest

from common.errors import ApiError
from tokenwire.v1 import common_pb2, worker_pb2
from workers.engines.echo import EchoEngine
from workers.server import resolve_max_tokens


def request(**sampling: int) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        prompt=common_pb2.TextOrTokens(text="a b c"), sampling=worker_pb2.SamplingParams(**sampling)
    )


@pytest.mark.parametrize("context", [0, 64])
def test_unset_is_none_and_set_is_kept(context: int) -> None:
    engine = EchoEngine("m", context_length=context)
    assert resolve_max_tokens(engine, request(), 3, "prompt") is None
    assert resolve_max_tokens(engine, request(max_tokens=5), 3, "prompt") == 5


def test_the_context_is_still_checked() -> None:
    engine = EchoEngine("m", context_length=8)
    with pytest.raises(ApiError) as info:
        resolve_max_tokens(engine, request(), 8, "prompt")  # unset, but no room for one token
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(ApiError):
        resolve_max_tokens(engine, request(max_tokens=6), 3, "prompt")
    assert resolve_max_tokens(engine, request(max_tokens=5), 3, "prompt") == 5
