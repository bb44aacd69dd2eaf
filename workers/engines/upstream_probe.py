"""What an OpenAI-compatible upstream honours, learned by asking it.

OpenAI-compatible servers differ in what they implement, and most ignore a
parameter they do not know instead of refusing it (llama.cpp's server drops
``echo``; llama-cpp-python drops ``n`` and ``stream_options``). Trusting them
would hand clients answers without what they asked for. So at start the openai
engine sends a few tiny streamed requests (1 to 4 tokens each), one parameter
at a time, and looks at each answer to see whether the parameter took effect:
did the text start with the prompt (echo), did two choices come back (n), did
a usage chunk arrive, and so on.

The result decides, per parameter, how a request that sets it is served:
forwarded (``native``), done by the engine itself where that is exact
(``emulated``), or refused with a 400 naming the param (``refused``). See
:func:`capabilities` and the README's openai engine section.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from common import errors
from tokenwire.v1 import common_pb2, worker_pb2

log = logging.getLogger("tokenwire.worker.openai")

NATIVE = common_pb2.PARAMETER_SUPPORT_NATIVE
EMULATED = common_pb2.PARAMETER_SUPPORT_EMULATED
REFUSED = common_pb2.PARAMETER_SUPPORT_REFUSED
ESTIMATED = common_pb2.PARAMETER_SUPPORT_ESTIMATED

# Every probe carries this header, so an upstream's log tells probes apart.
PROBE_HEADER = "x-tokenwire-probe"

_PROMPT = "The capital of France is"
_CHAT = [{"role": "user", "content": "Say hello."}]
_TOOL = {
    "type": "function",
    "function": {
        "name": "tokenwire_probe",
        "description": "Record a number.",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    },
}
# A schema whose every valid answer starts with {"zq": (text no model writes
# unasked); json_object is probed with a prompt whose natural answer is not JSON.
_SCHEMA = {
    "type": "object",
    "properties": {"zq": {"type": "integer"}},
    "required": ["zq"],
    "additionalProperties": False,
}
_SCHEMA_PREFIX = '{"zq":'


class ProbeFailed(Exception):
    """The upstream answered a probe with an HTTP error: the parameter is not honoured."""


class ProbeUnanswered(httpx.TransportError):
    """The upstream is busy or not ready (429, 502-504): probe again later, conclude nothing."""


# Statuses that say nothing about the parameter, only about the upstream's state.
_TRANSIENT = (429, 502, 503, 504)
# Each probe's own time limit: a tiny request; a slower upstream is probed again later.
PROBE_TIMEOUT = 30.0


@dataclass
class Streamed:
    """One probe's streamed answer, gathered per choice index."""

    text: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[Any]] = field(default_factory=dict)  # the raw logprobs objects, in order
    tool_names: set[str] = field(default_factory=set)
    usage: bool = False

    def first(self) -> str:
        return self.text.get(0, "")


# A streamed POST to the upstream: (path under /v1, body, probe name) -> the answer.
Post = Callable[[str, dict[str, Any], str], Awaitable[Streamed]]


async def stream_post(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any], name: str) -> Streamed:
    """Run one streamed probe. HTTP errors raise ProbeFailed; transport errors propagate."""
    out = Streamed()
    headers = {PROBE_HEADER: name}
    async with client.stream("POST", f"{url}{path}", json=body, headers=headers, timeout=PROBE_TIMEOUT) as response:
        if not response.is_success:
            await response.aread()
            reason = f"HTTP {response.status_code}: {response.text[:200]}"
            raise (ProbeUnanswered if response.status_code in _TRANSIENT else ProbeFailed)(reason)
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise ProbeFailed(f"malformed event {data[:100]!r}") from exc
            if not isinstance(chunk, dict) or "error" in chunk:
                raise ProbeFailed(f"error event {data[:200]}")
            if isinstance(chunk.get("usage"), dict) and chunk["usage"].get("completion_tokens") is not None:
                out.usage = True
            for choice in chunk.get("choices") or []:
                index = int(choice.get("index") or 0)
                delta = choice.get("delta") or {}
                text = choice.get("text") if "text" in choice else delta.get("content")
                out.text[index] = out.text.get(index, "") + (text or "")
                if choice.get("logprobs"):
                    out.logprobs.setdefault(index, []).append(choice["logprobs"])
                for call in delta.get("tool_calls") or []:
                    name_part = (call.get("function") or {}).get("name")
                    if name_part:
                        out.tool_names.add(name_part)
    return out


# -- The probes: each says whether one parameter took effect -----------------------


def _completions(**extra: Any) -> dict[str, Any]:
    return {"prompt": _PROMPT, "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}, **extra}


def _chat(**extra: Any) -> dict[str, Any]:
    return {"messages": _CHAT, "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}, **extra}


def _legacy_entries(answer: Streamed) -> tuple[list[str], list[Any], list[Any]]:
    tokens: list[str] = []
    values: list[Any] = []
    tops: list[Any] = []
    for item in answer.logprobs.get(0, []):
        tokens += item.get("tokens") or []
        values += item.get("token_logprobs") or []
        tops += item.get("top_logprobs") or []
    return tokens, values, tops


def _chat_entries(answer: Streamed) -> list[dict[str, Any]]:
    return [entry for item in answer.logprobs.get(0, []) for entry in (item.get("content") or [])]


def _is_schema_answer(text: str) -> bool:
    compact = re.sub(r"\s+", "", text)
    return compact.startswith("{") and (compact.startswith(_SCHEMA_PREFIX) or _SCHEMA_PREFIX.startswith(compact))


async def _honoured(post: Post, name: str, path: str, body: dict[str, Any], check: Callable[[Streamed], bool]) -> bool:
    try:
        answer = await post(path, body, name)
    except ProbeFailed as exc:
        log.info("upstream probe %s: refused (%s)", name, exc)
        return False
    return bool(check(answer))


async def probe(post: Post, chat: bool, model: str) -> dict[str, bool]:
    """What the upstream honours: {capability name: honoured?}.

    ``chat``: the model serves chat (and completions); else completions only.
    Transport errors propagate (the upstream is down: probe again later).
    """
    found: dict[str, bool] = {}

    async def check(name: str, path: str, body: dict[str, Any], test: Callable[[Streamed], bool]) -> None:
        found[name] = await _honoured(post, name, path, {"model": model, **body}, test)

    usage: dict[str, bool] = {}

    def saw_usage(endpoint: str) -> Callable[[Streamed], bool]:
        def test(answer: Streamed) -> bool:
            usage[endpoint] = answer.usage
            return True

        return test

    # Completions (chat models serve them too).
    await check("completions", "/completions", _completions(), saw_usage("completions"))
    await check("completions.echo", "/completions", _completions(echo=True), lambda a: a.first().startswith(_PROMPT))

    def echo_logprobs(answer: Streamed) -> bool:
        tokens, _, _ = _legacy_entries(answer)
        # The prompt's own tokens come back with logprobs, not only the new one.
        return answer.first().startswith(_PROMPT) and len(tokens) > 1 and _PROMPT in "".join(tokens)

    await check("completions.echo_logprobs", "/completions", _completions(echo=True, logprobs=1), echo_logprobs)

    def legacy_logprobs(answer: Streamed) -> bool:
        tokens, values, tops = _legacy_entries(answer)
        return bool(tokens) and values[:1] != [None] and bool(tops) and len(tops[0] or {}) >= 2

    await check("completions.logprobs", "/completions", _completions(logprobs=2), legacy_logprobs)

    main, body = ("/chat/completions", _chat) if chat else ("/completions", _completions)
    if chat:
        await check("chat", "/chat/completions", _chat(), saw_usage("chat"))

        def chat_logprobs(answer: Streamed) -> bool:
            entries = _chat_entries(answer)
            found["chat.top_logprobs"] = bool(entries) and len(entries[0].get("top_logprobs") or []) >= 2
            return bool(entries) and entries[0].get("logprob") is not None

        await check("chat.logprobs", main, _chat(logprobs=True, top_logprobs=2), chat_logprobs)
        found.setdefault("chat.top_logprobs", False)
        forced = {"type": "function", "function": {"name": "tokenwire_probe"}}
        await check("tools", main, _chat(tools=[_TOOL], tool_choice=forced, max_tokens=4), lambda a: bool(a.tool_names))
    # response_format on each endpoint: llama-cpp-python, for one, honours
    # json_object on chat only, and json_schema nowhere.
    schema = {"type": "json_schema", "json_schema": {"name": "probe", "schema": _SCHEMA, "strict": True}}
    for endpoint, path, make in (("chat", "/chat/completions", _chat), ("completions", "/completions", _completions)):
        if endpoint == "chat" and not chat:
            continue
        json_mode = make(response_format={"type": "json_object"}, max_tokens=2)
        await check(f"{endpoint}.response_format.json_object", path, json_mode, lambda a: a.first().lstrip()[:1] == "{")
        schema_mode = make(response_format=schema, max_tokens=4)
        await check(
            f"{endpoint}.response_format.json_schema", path, schema_mode, lambda a: _is_schema_answer(a.first())
        )
    await check("n", main, body(n=2), lambda a: {0, 1} <= set(a.text))

    # seed: the same seed twice at temperature 1 must give the same text.
    seeded = body(seed=20261201, temperature=1.0, max_tokens=4)
    texts: list[str] = []

    def same_text(answer: Streamed) -> bool:
        texts.append(answer.first())
        return len(texts) == 1 or texts[-1] == texts[0]

    await check("seed", main, seeded, same_text)
    if found["seed"]:
        await check("seed", main, seeded, same_text)
    found["stream_options.include_usage"] = usage.get("chat" if chat else "completions", False)
    return found


# -- From what the upstream honours to how each parameter is served -------------------


def capabilities(honoured: dict[str, bool], chat: bool, tokenizer: bool) -> common_pb2.EngineCapabilities:
    """How the engine serves each parameter, given what the upstream honours."""
    out = common_pb2.EngineCapabilities()

    def put(name: str, support: common_pb2.ParameterSupport.ValueType) -> None:
        out.parameters[name].upstream = honoured.get(name, False)
        out.parameters[name].support = support

    def native_or(name: str, otherwise: common_pb2.ParameterSupport.ValueType) -> None:
        put(name, NATIVE if honoured.get(name) else otherwise)

    # echo: the engine prepends the prompt text itself (exact). With logprobs
    # the prompt's logprobs are needed too: only the upstream has them.
    native_or("completions.echo", EMULATED)
    native_or("completions.echo_logprobs", REFUSED)
    native_or("completions.logprobs", REFUSED)
    if chat:
        native_or("chat.logprobs", REFUSED)
        native_or("chat.top_logprobs", REFUSED)
        native_or("tools", REFUSED)
    for endpoint in ("chat", "completions") if chat else ("completions",):
        native_or(f"{endpoint}.response_format.json_object", REFUSED)
        native_or(f"{endpoint}.response_format.json_schema", REFUSED)
    native_or("seed", REFUSED)
    # n: the gateway always fans a request out into n worker calls, one
    # upstream request per choice (exact), whatever the upstream does with n.
    put("n", EMULATED)
    # Usage: the upstream's own count when it sends one; else counted with its tokenizer.
    native_or("stream_options.include_usage", EMULATED if tokenizer else ESTIMATED)
    out.parameters["tokenize"].upstream = tokenizer
    out.parameters["tokenize"].support = NATIVE if tokenizer else REFUSED
    return out


def summary(caps: common_pb2.EngineCapabilities) -> str:
    """One log line: ``echo=emulated n=emulated seed=native ...``."""
    return " ".join(
        f"{name}={common_pb2.ParameterSupport.Name(cap.support).removeprefix('PARAMETER_SUPPORT_').lower()}"
        for name, cap in sorted(caps.parameters.items())
    )


# -- A request against what the upstream honours ------------------------------------


def _native(caps: common_pb2.EngineCapabilities | None, name: str) -> bool:
    if caps is None:  # not probed yet (the upstream is down): forward and see
        return True
    cap = caps.parameters.get(name)
    return cap is not None and cap.support == NATIVE


def echo_forwarded(request: worker_pb2.GenerateRequest, caps: common_pb2.EngineCapabilities | None) -> bool:
    """Whether the upstream echoes (else the engine puts the prompt in front itself)."""
    return request.echo and _native(caps, "completions.echo_logprobs" if request.logprobs else "completions.echo")


def refusal(
    request: worker_pb2.GenerateRequest, caps: common_pb2.EngineCapabilities | None, model: str
) -> errors.ApiError | None:
    """The 400 naming the param for what the upstream would drop and the engine
    cannot do itself (echo, n and usage are emulated instead); None: serve it."""
    chat = bool(request.messages)
    endpoint = "chat" if chat else "completions"
    fmt = request.response_format.type
    # (asked for?, the capability it needs, the OpenAI param, what to call it)
    needs = [
        (chat and request.logprobs, "chat.logprobs", "logprobs", "logprobs"),
        (chat and request.logprobs and request.top_logprobs > 0, "chat.top_logprobs", "top_logprobs", "top_logprobs"),
        # Tools the model may not call (tool_choice "none") need no support.
        (chat and bool(request.tools) and request.tool_choice.mode != "none", "tools", "tools", "tools"),
        (not chat and request.echo and request.logprobs, "completions.echo_logprobs", "echo", "echo with logprobs"),
        (not chat and request.logprobs, "completions.logprobs", "logprobs", "logprobs"),
        (fmt not in ("", "text"), f"{endpoint}.response_format.{fmt}", "response_format", f"response_format {fmt}"),
        (request.sampling.HasField("seed"), "seed", "seed", "seed"),
        # An emulated echo of token ids needs their text: the upstream's detokenizer.
        (
            not chat and request.echo and request.prompt.HasField("tokens") and not echo_forwarded(request, caps),
            "tokenize",
            "echo",
            "echo of a prompt of token ids",
        ),
    ]
    for wanted, capability, param, what in needs:
        if wanted and not _native(caps, capability):
            return errors.invalid_request(
                f"The upstream of `{model}` does not support {what} on {endpoint} completions.",
                param,
                "unsupported_parameter",
            )
    return None
