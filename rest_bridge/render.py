"""tokenwire.v1 responses -> OpenAI JSON objects, field for field.

The envelopes are here; the OpenAI shapes the openai engine speaks too (usage,
logprobs, tool calls) are in :mod:`common.openai_json`, written once for both.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import numpy as np

from common.openai_json import capabilities, legacy_logprobs, token_logprobs, tool_call, usage
from tokenwire.v1 import api_pb2, common_pb2


def model(m: api_pb2.Model) -> dict[str, Any]:
    kind = common_pb2.ModelKind.Name(m.kind).removeprefix("MODEL_KIND_").lower()
    out = {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": m.owned_by,
        "kind": kind,
        "context_length": m.context_length,
        "max_model_len": m.context_length,
        "workers": m.workers,
    }
    if m.HasField("capabilities"):
        out["capabilities"] = capabilities(m.capabilities)
    return out


def models(response: api_pb2.ListModelsResponse) -> dict[str, Any]:
    return {"object": "list", "data": [model(m) for m in response.data]}


def _header(r: Any) -> dict[str, Any]:
    """The fields every completion object and chunk starts with (the gateway names the object)."""
    return {"id": r.id, "object": r.object, "created": r.created, "model": r.model, "system_fingerprint": None}


def _chunk(out: dict[str, Any], r: Any, include_usage: bool) -> dict[str, Any]:
    # The gateway sends the usage chunk only with include_usage; then every other chunk has "usage": null.
    if r.HasField("usage"):
        out["usage"] = usage(r.usage)
    elif include_usage:
        out["usage"] = None
    return out


def _chat_logprobs(c: api_pb2.ChatCompletionChoice | api_pb2.ChatCompletionChunkChoice) -> dict[str, Any] | None:
    # Set by the gateway exactly when the caller asked for logprobs.
    return {"content": token_logprobs(c.logprobs.content), "refusal": None} if c.HasField("logprobs") else None


def chat_completion(r: api_pb2.CreateChatCompletionResponse) -> dict[str, Any]:
    choices = []
    for c in r.choices:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": c.message.content if c.message.HasField("content") else None,
            "refusal": None,
        }
        if c.message.tool_calls:
            message["tool_calls"] = [tool_call(t) for t in c.message.tool_calls]
        choices.append(
            {"index": c.index, "message": message, "logprobs": _chat_logprobs(c), "finish_reason": c.finish_reason}
        )
    return {**_header(r), "choices": choices, "usage": usage(r.usage)}


def chat_chunk(r: api_pb2.StreamChatCompletionResponse, include_usage: bool) -> dict[str, Any]:
    choices = []
    for c in r.choices:
        delta: dict[str, Any] = {}
        if c.delta.HasField("role"):
            delta["role"] = c.delta.role
        if c.delta.HasField("content"):
            delta["content"] = c.delta.content
        if c.delta.tool_calls:
            delta["tool_calls"] = [{"index": t.index, **tool_call(t)} for t in c.delta.tool_calls]
        choices.append(
            {
                "index": c.index,
                "delta": delta,
                "logprobs": _chat_logprobs(c),
                "finish_reason": c.finish_reason if c.HasField("finish_reason") else None,
            }
        )
    return _chunk({**_header(r), "choices": choices}, r, include_usage)


def _completion_choice(c: api_pb2.CompletionChoice) -> dict[str, Any]:
    return {
        "index": c.index,
        "text": c.text,
        # Set by the gateway exactly when the caller asked for logprobs.
        "logprobs": legacy_logprobs(c.logprobs.content) if c.HasField("logprobs") else None,
        "finish_reason": c.finish_reason if c.HasField("finish_reason") else None,
    }


def completion(r: api_pb2.CreateCompletionResponse) -> dict[str, Any]:
    choices = [_completion_choice(c) for c in r.choices]
    return {**_header(r), "choices": choices, "usage": usage(r.usage)}


def completion_chunk(r: api_pb2.StreamCompletionResponse, include_usage: bool) -> dict[str, Any]:
    choices = [_completion_choice(c) for c in r.choices]
    return _chunk({**_header(r), "choices": choices}, r, include_usage)


def _vector(values: Iterable[float], as_base64: bool) -> str | np.ndarray:
    # float32 as the model made it: orjson writes each value's shortest float32
    # form (about half the bytes of float64 digits, and faster); base64 is the
    # little-endian float32 bytes, as OpenAI sends them.
    vector = np.array(values, dtype="<f4")
    return base64.b64encode(vector.tobytes()).decode() if as_base64 else vector


def embeddings(r: api_pb2.CreateEmbeddingResponse, encoding_format: str) -> dict[str, Any]:
    as_base64 = encoding_format == "base64"
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": e.index, "embedding": _vector(e.embedding, as_base64)} for e in r.data
        ],
        "model": r.model,
        "usage": {"prompt_tokens": r.usage.prompt_tokens, "total_tokens": r.usage.total_tokens},
    }


def token_check(r: api_pb2.CheckTokensResponse) -> dict[str, Any]:
    # FastChat's camelCase keys, kept for its clients.
    return {
        "prompts": [{"fits": p.fits, "tokenCount": p.token_count, "contextLength": p.context_length} for p in r.prompts]
    }


def tokenize(r: api_pb2.TokenizeResponse) -> dict[str, Any]:
    # vLLM's shape.
    return {"tokens": list(r.tokens), "count": r.count, "max_model_len": r.max_model_len}


def detokenize(r: api_pb2.DetokenizeResponse) -> dict[str, Any]:
    return {"prompt": r.prompt}
