"""Cheap admission: refuse, before dispatching, what cannot fit the model.

A worker reports how many input bytes one token of its model can cover at
most (``ModelInfo.max_token_bytes``, see common/limits.py). A prompt whose size
alone proves it is longer than the context gets the same 400
``context_length_exceeded`` as the worker's token count would give, without
sending it anywhere or tokenizing it. Token-id prompts and inputs are counted
exactly. The worker checks the same again before it tokenizes (workers/admission.py).
"""

from __future__ import annotations

from common import limits
from tokenwire.v1 import api_pb2, common_pb2


def check_chat(request: api_pb2.CreateChatCompletionRequest, info: common_pb2.ModelInfo) -> None:
    if not info.max_token_bytes:
        return
    max_tokens: int | None = None
    if request.HasField("max_completion_tokens"):
        max_tokens = request.max_completion_tokens
    elif request.HasField("max_tokens"):
        max_tokens = request.max_tokens
    tokens = limits.min_tokens(limits.message_bytes(request.messages), info.max_token_bytes)
    limits.check_fits(info.context_length, tokens, max_tokens, "messages")


def check_completion(request: api_pb2.CreateCompletionRequest, info: common_pb2.ModelInfo) -> None:
    # OpenAI's default max_tokens for completions is 16, as the gateway sends it on.
    max_tokens = request.max_tokens if request.HasField("max_tokens") else 16
    for prompt in request.prompt:
        tokens, exact = limits.prompt_min_tokens(prompt, info.max_token_bytes)
        limits.check_fits(info.context_length, tokens, max_tokens, "prompt", exact=exact)


def check_embedding(request: api_pb2.CreateEmbeddingRequest, info: common_pb2.ModelInfo) -> None:
    """OpenAI's embeddings limits on what is known without a tokenizer: token-id
    inputs exactly, texts by their bound (their exact count is the worker's)."""
    counts = [limits.prompt_min_tokens(item, info.max_token_bytes) for item in request.input]
    limits.check_embedding_tokens(counts, info.context_length)
