"""The worker's own cheap admission: the gateway's size checks again, before
tokenizing (a caller may reach a worker directly, or through another gateway).

The bound is the engine's ``info.max_token_bytes`` (see common/limits.py);
these checks run before the request takes a slot, so a refusal never waits.
"""

from __future__ import annotations

from collections.abc import Sequence

from common import limits
from tokenwire.v1 import common_pb2, worker_pb2


def check_generate(request: worker_pb2.GenerateRequest, info: common_pb2.ModelInfo) -> None:
    max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
    if request.messages:
        if not info.max_token_bytes:
            return
        tokens = limits.min_tokens(limits.message_bytes(request.messages), info.max_token_bytes)
        limits.check_fits(info.context_length, tokens, max_tokens, "messages")
    else:
        tokens, exact = limits.prompt_min_tokens(request.prompt, info.max_token_bytes)
        limits.check_fits(info.context_length, tokens, max_tokens, "prompt", exact=exact)


def check_embed(inputs: Sequence[common_pb2.TextOrTokens], info: common_pb2.ModelInfo) -> None:
    limits.check_embedding_tokens(
        [limits.prompt_min_tokens(i, info.max_token_bytes) for i in inputs], info.context_length
    )
