"""OpenAI's generation parameters, one row each: name, type, range, default.

Everything that knows a sampling parameter reads it from here, by name:

- the gateway's checks (``gateway/validation.py``: :func:`check`);
- the gateway's copy into the worker's ``SamplingParams`` (``gateway/inference.py``: :func:`copy_sampling`);
- the bridge's OpenAPI request schemas (``rest_bridge/openapi.py``: :func:`schemas`);
- the openai engine's upstream JSON (``workers/engines/openai_upstream.py``: :func:`sampling_json`).

To add a sampling parameter: give ``CreateChatCompletionRequest``, ``CreateCompletionRequest`` and
``SamplingParams`` the field (``proto/``, then ``make proto``), add its row to :data:`SAMPLING`, and
let the engines that can honour it read it from ``SamplingParams``. ``tests/test_sampling.py`` checks
that every row matches its proto fields and that no ``SamplingParams`` field lacks a row.

No protobuf import: a message's own descriptor says which rows it carries.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from common import errors

# number / integer: an optional scalar; strings: a repeated string (JSON: one string or a list);
# bias: a map token id -> number (the range bounds the values).
Kind = Literal["number", "integer", "strings", "bias"]
M = TypeVar("M")  # a protobuf message


@dataclass(frozen=True)
class Limits:
    """Bounds an operator can tighten (OpenAI's own where it has them)."""

    max_n: int = 128
    max_tokens: int = 1 << 20
    max_embedding_inputs: int = 2048


def in_range(value: float, low: float, high: float, param: str) -> None:
    if not low <= value <= high:
        raise errors.invalid_request(
            f"{value} is out of range for '{param}': it must be between {low} and {high}.", param
        )


def at_least(value: float, low: float, param: str) -> None:
    if value < low:
        raise errors.invalid_request(f"{value} is less than the minimum of {low} - '{param}'", param)


def at_most(value: float, high: float, param: str) -> None:
    if value > high:
        raise errors.invalid_request(f"{value} is greater than the maximum of {high} - '{param}'", param)


@dataclass(frozen=True)
class Field:
    """One request parameter and its bounds."""

    name: str
    kind: Kind
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # the minimum itself is out of range
    cap: str | None = None  # the Limits attribute (an operator's flag) that is its maximum
    max_items: int | None = None  # strings, bias: at most this many
    default: Any = None  # what OpenAI assumes when it is unset (None: the engine's own)
    aliases: tuple[str, ...] = ()  # other names upstream servers read it by

    def highest(self, limits: Limits) -> float | None:
        return getattr(limits, self.cap) if self.cap else self.maximum

    def check(self, value: Any, limits: Limits) -> None:
        """A 400 naming the parameter when ``value`` is out of bounds (OpenAI's wording for each kind)."""
        name, low, high = self.name, self.minimum, self.highest(limits)
        if self.kind == "strings":
            if self.max_items is not None and len(value) > self.max_items:
                raise errors.invalid_request(f"'{name}' accepts at most {self.max_items} sequences.", name)
        elif self.kind == "bias":
            # Counted first: each id costs the engine work, and OpenAI allows 300.
            if self.max_items is not None and len(value) > self.max_items:
                raise errors.invalid_request(
                    f"'{name}' accepts at most {self.max_items} tokens; this one has {len(value)}.", name
                )
            for token, bias in value.items():
                if token < 0:  # the engines check the other end: only they know their vocabulary
                    raise errors.invalid_request(f"{name} names token {token}, which is not a token id.", name)
                if not low <= bias <= high:
                    raise errors.invalid_request(f"{name} for token {token} must be between {low} and {high}.", name)
        elif self.exclusive_minimum:
            if value <= low:
                raise errors.invalid_request(f"{name} must be greater than {low}.", name)
        elif self.cap is None and low is not None and high is not None:
            in_range(value, low, high, name)  # a fixed range reads as one; under an operator's cap, two bounds
        else:
            if low is not None:
                at_least(value, low, name)
            if high is not None:
                at_most(value, high, name)

    def schema(self, limits: Limits) -> dict[str, Any]:
        """Its JSON schema, as OpenAI's spec writes it (null allowed: null means unset)."""
        low, high = self.minimum, self.highest(limits)
        if self.kind == "strings":
            items: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
            if self.max_items is not None:
                items["maxItems"] = self.max_items
            return {"anyOf": [{"type": "string"}, items, {"type": "null"}]}
        if self.kind == "bias":
            values = {"type": "number", "minimum": low, "maximum": high}
            bias: dict[str, Any] = {"type": ["object", "null"], "additionalProperties": values}
            if self.max_items is not None:
                bias["maxProperties"] = self.max_items
            return bias
        schema: dict[str, Any] = {"type": [self.kind, "null"]}
        if low is not None:
            schema["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = low
        if high is not None:
            schema["maximum"] = high
        if self.default is not None:
            schema["default"] = self.default
        return schema


# Shared by chat and completions, in the order the gateway checks them (the first failure is the answer).
# The rows whose name SamplingParams has are copied to the worker; n is the gateway's (one call per choice).
SAMPLING: tuple[Field, ...] = (
    Field("temperature", "number", 0, 2, default=1),
    Field("top_p", "number", 0, 1, default=1),
    Field("n", "integer", 1, cap="max_n", default=1),
    # Unset: chat runs to the end of the context, completions stop at 16 (gateway/inference.py).
    Field("max_tokens", "integer", 1, cap="max_tokens"),
    Field("presence_penalty", "number", -2, 2, default=0),
    Field("frequency_penalty", "number", -2, 2, default=0),
    # Extensions honoured by local engines (vLLM and llama.cpp have them too). vLLM/SGLang/TGI say
    # repetition_penalty, llama.cpp's server repeat_penalty; each ignores the other's name.
    Field("repetition_penalty", "number", 0, exclusive_minimum=True, default=1, aliases=("repeat_penalty",)),
    Field("top_k", "integer", -1),
    Field("min_p", "number", 0, 1),
    Field("stop", "strings", max_items=4),
    Field("logit_bias", "bias", -100, 100, max_items=300),
    Field("seed", "integer", -(2**63), 2**63 - 1),  # int64, OpenAI's bounds
)
# Bounds of the parameters one API has and the other has not (checked after SAMPLING).
CHAT_ONLY: tuple[Field, ...] = (
    Field("max_completion_tokens", "integer", 1, cap="max_tokens"),
    Field("top_logprobs", "integer", 0, 20),
)
COMPLETION_ONLY: tuple[Field, ...] = (Field("logprobs", "integer", 0, 5),)
BY_NAME: Mapping[str, Field] = {field.name: field for field in (*SAMPLING, *CHAT_ONLY, *COMPLETION_ONLY)}


def is_set(message: Any, field: Field) -> bool:
    if field.kind in ("strings", "bias"):
        return len(getattr(message, field.name)) > 0
    return bool(message.HasField(field.name))


def check(message: Any, fields: Iterable[Field], limits: Limits) -> None:
    """Every set field of ``message`` within its bounds, or a 400 naming the first that is not."""
    for field in fields:
        if is_set(message, field):
            field.check(getattr(message, field.name), limits)


def _carried(message: Any) -> list[Field]:
    """The SAMPLING rows that ``message`` has a field for (its descriptor says)."""
    return [field for field in SAMPLING if field.name in message.DESCRIPTOR.fields_by_name]


def copy_sampling(source: Any, target: M) -> M:
    """Copy the sampling fields ``source`` sets into ``target`` (those it has), by name; returns ``target``."""
    for field in _carried(target):
        if not is_set(source, field):
            continue
        value = getattr(source, field.name)
        if field.kind == "strings":
            getattr(target, field.name).extend(value)
        elif field.kind == "bias":
            getattr(target, field.name).update(value)
        else:
            setattr(target, field.name, value)
    return target


def sampling_json(message: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The sampling fields ``message`` sets, as OpenAI JSON (under each alias too); the rest stays unset."""
    body: dict[str, Any] = {}
    for field in _carried(message):
        if field.name in skip or not is_set(message, field):
            continue
        value = getattr(message, field.name)
        if field.kind == "strings":
            value = list(value)
        elif field.kind == "bias":
            value = {str(token): bias for token, bias in value.items()}
        for name in (field.name, *field.aliases):
            body[name] = value
    return body


def schemas(fields: Iterable[Field], limits: Limits) -> dict[str, Any]:
    """``properties`` for an OpenAPI request schema."""
    return {field.name: field.schema(limits) for field in fields}


# -- the operator's bounds, a flag each: the gateway enforces them, the bridge documents them -------


def limit_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    parser.add_argument(
        "--max-n", type=int, default=defaults.max_n, help="largest n (choices per request) the gateway accepts"
    )
    parser.add_argument(
        "--max-tokens-limit", type=int, default=defaults.max_tokens, help="largest max_tokens the gateway accepts"
    )


def limits(args: argparse.Namespace) -> Limits:
    return Limits(max_n=args.max_n, max_tokens=args.max_tokens_limit)
