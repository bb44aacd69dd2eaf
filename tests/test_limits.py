"""The cheap token bound's arithmetic (common/limits.py); that real tokenizers
keep the bound is tested in tests/test_admission.py."""

from __future__ import annotations

import pytest

from common import limits
from common.errors import ApiError
from tokenwire.v1 import common_pb2


def test_sizes_are_utf8_bytes_of_text_content_only() -> None:
    assert limits.utf8_bytes("abc") == 3
    assert limits.utf8_bytes("é東🙂") == 2 + 3 + 4
    parts = common_pb2.ContentParts(
        parts=[
            common_pb2.ContentPart(type="text", text="héllo"),
            common_pb2.ContentPart(type="image_url", image_url=common_pb2.ImageUrl(url="x" * 1000)),
        ]
    )
    messages = [
        common_pb2.ChatMessage(role="user", content="abcd"),
        common_pb2.ChatMessage(role="user", content_parts=parts),
    ]
    assert limits.message_bytes(messages) == 4 + 6


def test_min_tokens_rounds_up_and_zero_means_no_bound() -> None:
    assert limits.min_tokens(81, 81) == 1
    assert limits.min_tokens(82, 81) == 2
    assert limits.min_tokens(10**6, 0) == 0


def test_check_fits_refuses_only_what_cannot_fit() -> None:
    limits.check_fits(8192, 8191, None, "messages")  # one token left to generate
    limits.check_fits(8192, 8000, 192, "messages")
    limits.check_fits(0, 10**9, None, "prompt")  # no known context
    with pytest.raises(ApiError) as caught:
        limits.check_fits(8192, 8192, None, "messages")
    assert caught.value.code == "context_length_exceeded" and "at least 8193 tokens" in caught.value.message
    with pytest.raises(ApiError) as caught:
        limits.check_fits(8192, 8000, 193, "prompt", exact=True)
    assert caught.value.param == "prompt" and "requested 8193 tokens (8000 in the prompt" in caught.value.message


def test_embedding_token_limits() -> None:
    limits.check_embedding_tokens([(8192, True)] * 36, 0)
    with pytest.raises(ApiError) as caught:
        limits.check_embedding_tokens([(5, True), (300, False)], 256)
    assert caught.value.param == "input" and "input[1] is at least 300 tokens" in caught.value.message
    with pytest.raises(ApiError) as caught:
        limits.check_embedding_tokens([(8192, True)] * 37, 0)
    assert caught.value.code == "max_tokens_per_request" and caught.value.http_status == 400
