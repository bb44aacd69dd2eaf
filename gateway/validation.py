"""Request checks with OpenAI's ranges. Every failure is a 400 naming its param.

The REST bridge only translates JSON to protobuf; these checks run in the
gateway so that gRPC callers and REST callers get the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from common import errors
from tokenwire.v1 import api_pb2, common_pb2

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
RESPONSE_FORMATS = frozenset({"", "text", "json_object", "json_schema"})
TOOL_CHOICE_MODES = frozenset({"none", "auto", "required"})


@dataclass(frozen=True)
class Limits:
    """Bounds an operator can tighten (OpenAI's own where it has them)."""

    max_n: int = 128
    max_tokens: int = 1 << 20
    max_embedding_inputs: int = 2048


def _range(value: float, low: float, high: float, param: str) -> None:
    if not low <= value <= high:
        raise errors.invalid_request(
            f"{value} is out of range for '{param}': it must be between {low} and {high}.", param
        )


def _at_least(value: int, low: int, param: str) -> None:
    if value < low:
        raise errors.invalid_request(f"{value} is less than the minimum of {low} - '{param}'", param)


def _at_most(value: int, high: int, param: str) -> None:
    if value > high:
        raise errors.invalid_request(f"{value} is greater than the maximum of {high} - '{param}'", param)


def _model(model: str) -> None:
    if not model:
        raise errors.invalid_request("you must provide a model parameter", "model")


def _sampling(request: api_pb2.CreateChatCompletionRequest | api_pb2.CreateCompletionRequest, limits: Limits) -> None:
    if request.HasField("temperature"):
        _range(request.temperature, 0, 2, "temperature")
    if request.HasField("top_p"):
        _range(request.top_p, 0, 1, "top_p")
    if request.HasField("n"):
        _at_least(request.n, 1, "n")
        _at_most(request.n, limits.max_n, "n")
    if request.HasField("max_tokens"):
        _at_least(request.max_tokens, 1, "max_tokens")
        _at_most(request.max_tokens, limits.max_tokens, "max_tokens")
    for name in ("presence_penalty", "frequency_penalty"):
        if request.HasField(name):
            _range(getattr(request, name), -2, 2, name)
    if request.HasField("repetition_penalty") and request.repetition_penalty <= 0:
        raise errors.invalid_request("repetition_penalty must be greater than 0.", "repetition_penalty")
    if request.HasField("top_k"):
        _at_least(request.top_k, -1, "top_k")
    if request.HasField("min_p"):
        _range(request.min_p, 0, 1, "min_p")
    if len(request.stop) > 4:
        raise errors.invalid_request("'stop' accepts at most 4 sequences.", "stop")
    for token, bias in request.logit_bias.items():
        if not -100 <= bias <= 100:
            raise errors.invalid_request(f"logit_bias for token {token} must be between -100 and 100.", "logit_bias")
    _response_format(request.response_format)


def _response_format(response_format: common_pb2.ResponseFormat) -> None:
    if response_format.type not in RESPONSE_FORMATS:
        raise errors.invalid_request(
            f"Invalid value: '{response_format.type}'. Supported values are: 'text', 'json_object' and 'json_schema'.",
            "response_format.type",
        )
    if response_format.type == "json_schema" and not response_format.json_schema.name:
        raise errors.invalid_request(
            "response_format.json_schema.name is required.", "response_format.json_schema.name"
        )


def _message(message: common_pb2.ChatMessage, i: int) -> None:
    if message.role not in ROLES:
        raise errors.invalid_request(
            f"Invalid value: '{message.role}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'.",
            f"messages[{i}].role",
        )
    has_content = message.WhichOneof("content_kind") is not None
    if message.role == "assistant":
        if not has_content and not message.tool_calls:
            raise errors.invalid_request(
                "An assistant message needs 'content' or 'tool_calls'.", f"messages[{i}].content"
            )
    elif not has_content:
        raise errors.invalid_request(f"Missing 'content' in messages[{i}].", f"messages[{i}].content")
    if message.role == "tool" and not message.tool_call_id:
        raise errors.invalid_request("A tool message needs 'tool_call_id'.", f"messages[{i}].tool_call_id")
    if message.HasField("content_parts"):
        for j, part in enumerate(message.content_parts.parts):
            if part.type not in ("text", "image_url"):
                raise errors.invalid_request(
                    f"Invalid content part type '{part.type}'.", f"messages[{i}].content[{j}].type"
                )


def check_chat(request: api_pb2.CreateChatCompletionRequest, limits: Limits) -> None:
    _model(request.model)
    if not request.messages:
        raise errors.invalid_request("[] is too short - 'messages'", "messages")
    for i, message in enumerate(request.messages):
        _message(message, i)
    _sampling(request, limits)
    if request.HasField("max_completion_tokens"):
        _at_least(request.max_completion_tokens, 1, "max_completion_tokens")
        _at_most(request.max_completion_tokens, limits.max_tokens, "max_completion_tokens")
    if request.HasField("top_logprobs"):
        _range(request.top_logprobs, 0, 20, "top_logprobs")
        if not request.logprobs:
            raise errors.invalid_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    choice = request.tool_choice
    if choice.WhichOneof("kind") == "mode" and choice.mode not in TOOL_CHOICE_MODES:
        raise errors.invalid_request(
            f"Invalid value: '{choice.mode}'. Supported values are: 'none', 'auto' and 'required'.", "tool_choice"
        )
    if choice.WhichOneof("kind") == "function":
        names = {tool.function.name for tool in request.tools}
        if choice.function.function.name not in names:
            raise errors.invalid_request(
                f"tool_choice names '{choice.function.function.name}', which is not in 'tools'.", "tool_choice"
            )
    for i, tool in enumerate(request.tools):
        if tool.type != "function" or not tool.function.name:
            raise errors.invalid_request("Each tool needs type 'function' and a function name.", f"tools[{i}]")


def check_completion(request: api_pb2.CreateCompletionRequest, limits: Limits) -> None:
    _model(request.model)
    if not request.prompt:
        raise errors.invalid_request("prompt must not be empty.", "prompt")
    for item in request.prompt:
        if item.HasField("tokens") and not item.tokens.ids:
            raise errors.invalid_request("A token-id prompt must not be empty.", "prompt")
    _sampling(request, limits)
    if request.HasField("logprobs"):
        _range(request.logprobs, 0, 5, "logprobs")
    if request.suffix:
        raise errors.invalid_request("suffix is not supported by tokenwire's models.", "suffix")
    if request.HasField("best_of"):
        n = request.n if request.HasField("n") else 1
        if request.best_of != n:
            raise errors.invalid_request("best_of is only supported when equal to n.", "best_of")


def check_embedding(request: api_pb2.CreateEmbeddingRequest, limits: Limits) -> None:
    _model(request.model)
    if not request.input:
        raise errors.invalid_request("'input' must not be empty.", "input")
    if len(request.input) > limits.max_embedding_inputs:
        raise errors.invalid_request(
            f"'input' has {len(request.input)} items; at most {limits.max_embedding_inputs} are allowed.", "input"
        )
    for i, item in enumerate(request.input):
        if (item.HasField("text") and not item.text) or (item.HasField("tokens") and not item.tokens.ids):
            raise errors.invalid_request(f"'input[{i}]' must not be empty.", "input")
        if item.WhichOneof("kind") is None:
            raise errors.invalid_request(f"'input[{i}]' must not be empty.", "input")
    if request.encoding_format not in ("", "float", "base64"):
        raise errors.invalid_request(
            f"Invalid value: '{request.encoding_format}'. Supported values are: 'float' and 'base64'.",
            "encoding_format",
        )
    if request.HasField("dimensions"):
        _at_least(request.dimensions, 1, "dimensions")
