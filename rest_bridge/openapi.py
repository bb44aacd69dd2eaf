"""Request and error schemas for the bridge's /openapi.json.

The handlers parse bodies themselves (into protobuf, with OpenAI-style
errors), so FastAPI cannot infer these; they are written out here from
OpenAI's spec (the subset tokenwire serves); the sampling parameters' from
common/sampling.py's table, with the operator's limits. Clients, docs and the
fuzz test read them.
"""

from __future__ import annotations

from typing import Any

from common import sampling
from common.sampling import Limits

_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_TEXT_OR_TOKENS = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        _TOKENS,
        {"type": "array", "items": _TOKENS},
    ]
}
# Besides the sampling table's rows (common/sampling.py), both generation APIs take these.
_GENERATION: dict[str, Any] = {
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string"},
    # Requests that share a key go to one worker, whose prefix cache serves them all (docs/api.md).
    "prompt_cache_key": {"type": "string"},
}
_MODEL = {"type": "string", "examples": ["echo-chat", "smollm2-135m-instruct"]}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {
                            "type": {"type": "string", "enum": ["text", "image_url"]},
                            "text": {"type": "string"},
                        },
                    },
                },
                {"type": "null"},
            ]
        },
        "name": {"type": "string"},
        "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
    },
}
_RESPONSE_FORMAT = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": {"type": "object"}}},
    },
}


def _generation(
    limits: Limits, input_name: str, input_schema: dict[str, Any], only: tuple[sampling.Field, ...], **rest: Any
) -> dict[str, Any]:
    """A generation body: the model, its input, the sampling table's rows (with the operator's
    --max-n and --max-tokens-limit as maxima), then the API's own parameters."""
    return {
        "type": "object",
        "required": ["model", input_name],
        "properties": {
            "model": _MODEL,
            input_name: input_schema,
            **sampling.schemas(sampling.SAMPLING, limits),
            **_GENERATION,
            **sampling.schemas(only, limits),
            **rest,
        },
    }


def chat(limits: Limits) -> dict[str, Any]:
    """/v1/chat/completions' body."""
    return _generation(
        limits,
        "messages",
        {"type": "array", "items": _MESSAGE, "minItems": 1},
        sampling.CHAT_ONLY,
        logprobs={"type": ["boolean", "null"]},
        response_format=_RESPONSE_FORMAT,
        tools={"type": "array", "items": {"type": "object"}},
        tool_choice={"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}]},
        parallel_tool_calls={"type": "boolean"},
    )


def completion(limits: Limits) -> dict[str, Any]:
    """/v1/completions' body."""
    return _generation(
        limits,
        "prompt",
        _TEXT_OR_TOKENS,
        sampling.COMPLETION_ONLY,
        echo={"type": ["boolean", "null"]},
        # The gateway's rule is "equal to n" (one choice is generated per n).
        best_of={"type": ["integer", "null"], "minimum": 1, "maximum": 20},
        suffix={"type": ["string", "null"]},
    )


EMBEDDING = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "model": {"type": "string", "examples": ["echo-embedding", "all-minilm-l6-v2"]},
        "input": _TEXT_OR_TOKENS,
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
        "user": {"type": "string"},
    },
}
TOKEN_CHECK = {
    "type": "object",
    "required": ["prompts"],
    "properties": {
        "prompts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["model", "prompt", "max_tokens"],
                "properties": {
                    "model": _MODEL,
                    "prompt": {"type": "string"},
                    "max_tokens": {"type": "integer", "minimum": 0},
                },
            },
        }
    },
}
TOKENIZE = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": _MODEL,
        "prompt": {"type": "string"},
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "add_special_tokens": {"type": "boolean"},
    },
}
DETOKENIZE = {
    "type": "object",
    "required": ["model", "tokens"],
    "properties": {"model": _MODEL, "tokens": _TOKENS},
}
RESPONSE = {
    "type": "object",
    "properties": {
        "model": _MODEL,
        "input": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "type": {"type": "string", "enum": ["message", "function_call", "function_call_output"]},
                            "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
                            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
                            "call_id": {"type": "string"},
                            "name": {"type": "string"},
                            "arguments": {"type": "string"},
                            "output": {"type": "string"},
                        },
                    },
                },
            ]
        },
        "instructions": {"type": ["string", "null"]},
        "previous_response_id": {"type": ["string", "null"]},
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1},
        **sampling.schemas([sampling.BY_NAME["temperature"], sampling.BY_NAME["top_p"]], Limits()),
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "text": {"type": "object", "properties": {"format": {"type": "object"}}},
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string", "maxLength": 512}},
        "store": {"type": ["boolean", "null"]},
        "stream": {"type": ["boolean", "null"]},
        "user": {"type": "string"},
        "prompt_cache_key": {"type": "string"},
    },
}
BATCH = {
    "type": "object",
    "required": ["input_file_id", "endpoint", "completion_window"],
    "properties": {
        "input_file_id": {"type": "string"},
        "endpoint": {
            "type": "string",
            "enum": ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"],
        },
        "completion_window": {"type": "string", "enum": ["24h"]},
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string", "maxLength": 512}},
    },
}
FILE_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                    },
                }
            }
        },
    }
}
INPUT_ITEMS_QUERY = {
    "parameters": [
        {"name": "order", "in": "query", "required": False, "schema": {"type": "string", "enum": ["asc", "desc"]}},
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
        },
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
    ]
}
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body follows ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"schema": ERROR}}}
    for status, description in (
        (400, "Bad request"),
        (401, "Invalid API key"),
        (404, "Model not found"),
        (413, "Body too large"),
        (429, "Rate limited (see Retry-After)"),
        (503, "No live worker"),
        (504, "Deadline exceeded"),
    )
}
