"""Size limits every part shares, and the cheap bound on prompt tokens.

The cheap checks (:func:`check_generate`, :func:`check_embedding_inputs`) run
where a request enters: in the gateway before it dispatches, and again in the
worker before a request takes a slot (a caller may reach a worker directly).
Both read the worker request as the gateway settled it (its max_tokens
included), so the rule is written and decided once, here. The exact count is
the worker's (workers/admission.py).

The cheap bound: a worker whose tokenizer guarantees that no token covers
more than ``L`` bytes of its input reports ``L`` as ``ModelInfo.max_token_bytes``
(0 = no such guarantee). A text of ``b`` UTF-8 bytes is then at least
``ceil(b / L)`` tokens, so a prompt whose size alone proves it cannot fit the
context is refused before anything tokenizes it. Chat templates and special
tokens only add tokens, so the bound holds for a rendered prompt too (the text
counted is the messages' content; an engine reports a bound for chat only if its
template renders that content whole).
"""

from __future__ import annotations

from collections.abc import Iterable

from common import errors
from tokenwire.v1 import common_pb2, worker_pb2

# OpenAI's embeddings limits (the API reference of POST /v1/embeddings); its
# 2,048 inputs per request are the gateway's Limits.max_embedding_inputs.
EMBEDDING_MAX_INPUT_TOKENS = 8192
EMBEDDING_MAX_REQUEST_TOKENS = 300_000


def utf8_bytes(text: str) -> int:
    # len() counts characters; a character is 1 to 4 bytes. Encoding only when
    # it can matter keeps a plainly short text free.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def message_bytes(messages: Iterable[common_pb2.ChatMessage]) -> int:
    """The UTF-8 size of the messages' text content (what any template renders)."""
    total = 0
    for message in messages:
        if message.HasField("content_parts"):
            total += sum(utf8_bytes(part.text) for part in message.content_parts.parts if part.type == "text")
        else:
            total += utf8_bytes(message.content)
    return total


def min_tokens(size: int, max_token_bytes: int) -> int:
    """The fewest tokens ``size`` bytes of text can be (0 without a bound)."""
    if max_token_bytes <= 0:
        return 0
    return -(-size // max_token_bytes)


def prompt_min_tokens(prompt: common_pb2.TextOrTokens, max_token_bytes: int) -> tuple[int, bool]:
    """The fewest tokens a completion prompt is, and whether that is exact (token ids)."""
    if prompt.HasField("tokens"):
        return len(prompt.tokens.ids), True
    if max_token_bytes <= 0:
        return 0, False
    return min_tokens(utf8_bytes(prompt.text), max_token_bytes), False


def check_fits(context: int, prompt_tokens: int, max_tokens: int | None, param: str, *, exact: bool = False) -> None:
    """Refuse a prompt of at least ``prompt_tokens`` that cannot fit ``context``
    with ``max_tokens`` more (None: at least one more), as the worker's
    token-counted check would: the same 400 ``context_length_exceeded``."""
    if not context or not (prompt_tokens or exact):
        return
    wanted = 1 if max_tokens is None else max_tokens
    if prompt_tokens + wanted > context:
        raise errors.context_length_exceeded(context, prompt_tokens, wanted, param, at_least=not exact)


def check_embedding_tokens(counts: list[tuple[int, bool]], context: int) -> None:
    """OpenAI's per-input and per-request token limits (and the model's context)
    on inputs of (at least, or exactly) these many tokens each."""
    per_input = min(context, EMBEDDING_MAX_INPUT_TOKENS) if context else EMBEDDING_MAX_INPUT_TOKENS
    for i, (count, exact) in enumerate(counts):
        if count > per_input:
            raise errors.embedding_input_too_long(i, count, per_input, at_least=not exact)
    total = sum(count for count, _ in counts)
    if total > EMBEDDING_MAX_REQUEST_TOKENS:
        exact = all(exact for _, exact in counts)
        raise errors.embedding_request_too_long(total, EMBEDDING_MAX_REQUEST_TOKENS, at_least=not exact)


def check_generate(request: worker_pb2.GenerateRequest, info: common_pb2.ModelInfo) -> None:
    """Refuse a choice whose prompt's size alone proves it cannot fit the context with its max_tokens."""
    max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
    if request.messages:
        if info.max_token_bytes:
            tokens = min_tokens(message_bytes(request.messages), info.max_token_bytes)
            check_fits(info.context_length, tokens, max_tokens, "messages")
    else:
        tokens, exact = prompt_min_tokens(request.prompt, info.max_token_bytes)
        check_fits(info.context_length, tokens, max_tokens, "prompt", exact=exact)


def check_embedding_inputs(inputs: Iterable[common_pb2.TextOrTokens], info: common_pb2.ModelInfo) -> None:
    """OpenAI's embeddings limits on what is known without a tokenizer: token-id
    inputs exactly, texts by their bound (their exact count is the worker's)."""
    check_embedding_tokens([prompt_min_tokens(i, info.max_token_bytes) for i in inputs], info.context_length)
