"""The ``openai`` engine: one model of an upstream OpenAI-compatible server.

This is how tokenwire fronts vLLM, TGI, SGLang or llama.cpp server fleets: the
worker registers the model with the gateway as usual and forwards each request
to the upstream over one pooled :class:`httpx.AsyncClient`, streaming always.

What the upstream does not tell us is filled in conservatively:

* the context length comes from ``GET /models`` (vLLM's ``max_model_len``,
  llama.cpp's ``meta.n_ctx_train``), else ``--context-length``, else 0 (the
  worker then skips its context check and the upstream enforces its own);
* prompt tokens come from the upstream's tokenize endpoint (probed once at
  start) and fall back to an estimate when it has none;
* what the upstream honours of OpenAI's parameters is probed at start
  (:mod:`workers.engines.upstream_probe`): a parameter it would drop is
  emulated where that is exact (echo, usage; ``n`` is the gateway's fan-out)
  and refused with a 400 naming the param otherwise, never forwarded to be lost;
* a request without ``max_tokens`` goes without it: the upstream's own limit.

Cancellation: the stream is read inside ``async with client.stream(...)``; when
the worker cancels or closes the generator, leaving that block closes the
connection, which is how an upstream learns that the client went away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from common import errors, openai_json
from common.sampling import sampling_json
from common.settings import FlagAdder
from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Delta, Engine, Generation, Prepared, message_text
from workers.engines import upstream_probe

log = logging.getLogger("tokenwire.worker.openai")

KINDS = {
    "chat": common_pb2.MODEL_KIND_CHAT,
    "completion": common_pb2.MODEL_KIND_COMPLETION,
    "embedding": common_pb2.MODEL_KIND_EMBEDDING,
}


def _vllm_tokenize(
    model: str, text: str | None, messages: Sequence[common_pb2.ChatMessage] | None, special: bool | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if messages is not None:
        body.update(messages=[openai_json.message(m) for m in messages], add_generation_prompt=True)
    else:
        body["prompt"] = text
    if special is not None:
        body["add_special_tokens"] = special
    return body


@dataclass(frozen=True)
class Tokenizer:
    """One upstream's dialect of tokenize and detokenize: its endpoints (under the server
    root, where vLLM and llama.cpp put them) and their JSON."""

    name: str
    tokenize_path: str
    # (model, text, messages, add special tokens: None = the upstream's default) -> body
    tokenize_body: Callable[[str, str | None, Sequence[common_pb2.ChatMessage] | None, bool | None], dict[str, Any]]
    detokenize_path: str
    detokenize_body: Callable[[str, Sequence[int]], dict[str, Any]]
    detokenized_key: str  # where detokenize's text comes back
    renders_chat: bool = False  # tokenizes messages with the model's chat template


# Probed in this order at start; the first that tokenizes "hello" is the upstream's.
TOKENIZERS = (
    Tokenizer(
        "vllm", "/tokenize", _vllm_tokenize,
        "/detokenize", lambda model, ids: {"model": model, "tokens": list(ids)}, "prompt", renders_chat=True,
    ),
    Tokenizer(
        "llama.cpp", "/tokenize", lambda model, text, messages, special: {"content": text, "add_special": special is not False},
        "/detokenize", lambda model, ids: {"tokens": list(ids)}, "content",
    ),
    Tokenizer(
        "llama-cpp-python", "/extras/tokenize", lambda model, text, messages, special: {"model": model, "input": text},
        "/extras/detokenize", lambda model, ids: {"model": model, "tokens": list(ids)}, "text",
    ),
)  # fmt: skip

# -- The CLI -----------------------------------------------------------------


def add_arguments(group: FlagAdder) -> None:
    group.add_argument("--upstream-url", help="Base URL of the upstream OpenAI API, including /v1.")
    group.add_argument("--upstream-model", help="The upstream's model id (default: --model-name).")
    group.add_argument("--upstream-api-key", help="Bearer key for the upstream (or TOKENWIRE_UPSTREAM_API_KEY).")
    group.add_argument("--upstream-timeout", type=float, default=600.0, help="Seconds to wait on the upstream.")
    group.add_argument(
        "--context-length", type=int, default=0, help="Context length, when the upstream does not report one."
    )
    group.add_argument("--upstream-kind", choices=sorted(KINDS), default="chat", help="What the model is for.")


def build(args: argparse.Namespace) -> Engine:
    if not args.upstream_url:
        raise SystemExit("--upstream-url is required with --engine openai")
    return OpenAIUpstreamEngine(
        args.model_name,
        url=args.upstream_url,
        upstream_model=args.upstream_model or args.model_name,
        api_key=args.upstream_api_key,
        timeout=args.upstream_timeout,
        context_length=args.context_length,
        kind=args.upstream_kind,
    )


# -- Translation helpers (the OpenAI shapes themselves are in common.openai_json) --


def sampling_to_json(sampling: worker_pb2.SamplingParams) -> dict[str, Any]:
    """Only the fields the caller set: the upstream applies its own defaults to the rest.

    By common/sampling.py's table (repetition_penalty goes under llama.cpp's name, repeat_penalty,
    too). max_tokens is the request builder's: the caller's, or left out (the upstream's default)."""
    return sampling_json(sampling, skip=("max_tokens",))


# -- Error mapping -------------------------------------------------------------


def _error_fields(body: Any) -> tuple[str, str | None, Any]:
    """(message, param, code) from the error shapes upstreams use."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            param = error.get("param")
            return str(error.get("message") or error), param if isinstance(param, str) else None, error.get("code")
        if isinstance(error, str):  # TGI: {"error": "...", "error_type": "..."}
            return error, None, None
        detail = body.get("detail")  # FastAPI: {"detail": "..."} or a validation list
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            loc = detail[0].get("loc") or []
            return str(detail[0].get("msg") or detail), str(loc[-1]) if loc else None, None
        if detail is not None:
            return str(detail), None, None
    return str(body)[:500] or "no error message", None, None


def upstream_error(status: int, body: Any, model: str, headers: httpx.Headers | None = None) -> errors.ApiError:
    """One upstream HTTP error as the ApiError a client should see."""
    message, param, code = _error_fields(body)
    # Upstreams such as vLLM and llama.cpp put the HTTP status in `code`;
    # only OpenAI-style string codes mean something to clients.
    code = code if isinstance(code, str) else None
    if status in (401, 403):
        # Our key, not the client's: the operator must fix it.
        return errors.unavailable("upstream rejected our credentials")
    if status == 404:
        if code == "model_not_found" or "model" in message.lower():
            return errors.model_not_found(model)
        return errors.unavailable(f"upstream returned 404: {message}")
    if status == 429:
        retry = headers.get("retry-after", "") if headers else ""
        try:
            seconds = int(float(retry))
        except ValueError:
            seconds = 1
        return errors.rate_limited(f"The upstream is rate limiting: {message}", retry_after=seconds)
    if 400 <= status < 500:
        return errors.invalid_request(message, param=param, code=code)
    return errors.unavailable(f"upstream error {status}: {message}")


def _transport_error(exc: httpx.HTTPError) -> errors.ApiError:
    if isinstance(exc, httpx.TimeoutException):
        return errors.unavailable(f"upstream timed out ({type(exc).__name__})")
    return errors.unavailable(f"upstream unreachable: {type(exc).__name__}: {exc}")


# -- The engine ----------------------------------------------------------------


@dataclass
class _Counting:
    """What the usage count needs when the upstream sends none."""

    max_tokens: int | None
    echoed: str  # prompt text the upstream echoed in front of the output
    text: list[str] = field(default_factory=list)


@dataclass
class _UpstreamPrompt:
    """What the upstream says of the prompt: its own count (the template's tokens included, which
    ours may only estimate) and the tokens it took from its prefix cache (None: it did not say)."""

    tokens: int | None = None
    cached: int | None = None

    def read(self, chunk: dict[str, Any]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.tokens = _count(usage.get("prompt_tokens"), self.tokens)
            details = usage.get("prompt_tokens_details")  # vLLM, SGLang, llama-server
            if isinstance(details, dict):
                self.cached = _count(details.get("cached_tokens"), self.cached)
        timings = chunk.get("timings")  # llama-server, also where its usage has no details
        if self.cached is None and isinstance(timings, dict):
            self.cached = _count(timings.get("cache_n"), None)


def _count(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


@dataclass
class _ToolCallAcc:
    id: str = ""
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class OpenAIUpstreamEngine(Engine):
    def __init__(
        self,
        model: str,
        *,
        url: str,
        upstream_model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        context_length: int = 0,
        kind: str = "chat",
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
    ) -> None:
        self.info = common_pb2.ModelInfo(name=model, kind=KINDS[kind], engine="openai")
        self.url = url.rstrip("/")
        # vLLM's /tokenize and llama.cpp's native endpoints live at the server root.
        self.root = self.url.removesuffix("/v1")
        self.upstream_model = upstream_model or model
        self.api_key = api_key
        self.timeout = timeout
        self.context_length_flag = context_length
        self.transport = transport
        self._client: httpx.AsyncClient | None = None
        # The upstream's tokenizer dialect (None: it has none; counts are estimates).
        self.tokenizer: Tokenizer | None = None
        # Tokens the tokenizer adds to any text (BOS), left out of usage counts.
        self._tokenizer_overhead = 0
        # How each OpenAI parameter is served, from probing the upstream (None: not yet).
        self.capabilities: common_pb2.EngineCapabilities | None = None
        self._discovered = False
        self._discovering = asyncio.Lock()  # one discovery at a time, however many requests wait on it

    # -- Lifetime -----------------------------------------------------------

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=60.0),
            transport=self.transport,
        )
        self.info.context_length = self.context_length_flag
        await self._discover()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise errors.unavailable("the upstream engine is not started")
        return self._client

    async def _discover(self) -> None:
        """Context length, dimensions, tokenizer and parameters, once the upstream answers.

        An upstream that is down or still loading is not fatal (it may come up
        later): every request that needs what it tells calls this first, and
        discovery is tried again until it succeeds.
        """
        if self._discovered:
            return
        async with self._discovering:
            if not self._discovered:
                await self._discover_now()

    async def _discover_now(self) -> None:
        try:
            response = await self.client.get(f"{self.url}/models")
            models = response.json() if response.is_success else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("upstream %s: GET /models failed (%s); will retry", self.url, exc)
            return
        if models is None:
            log.warning("upstream %s: GET /models answered %d; will retry", self.url, response.status_code)
            return
        self._discovered = True
        context = self._context_from_models(models)
        if context:
            self.info.context_length = context
        if self.info.kind == common_pb2.MODEL_KIND_EMBEDDING:
            try:
                vectors, _ = await self.embed([common_pb2.TextOrTokens(text="hello")], None)
                self.info.dimensions = len(vectors[0])
            except errors.ApiError as exc:
                log.warning("could not learn the embedding dimensions: %s", exc.message)
        else:
            self.tokenizer = await self._probe_tokenizer()
            if not await self._probe_parameters():
                self._discovered = False
                return
        log.info(
            "upstream %s model %s: context length %d, tokenizer %s",
            self.url,
            self.upstream_model,
            self.info.context_length,
            self.tokenizer.name if self.tokenizer else "none (estimates)",
        )

    async def _probe_parameters(self) -> bool:
        """Learn what the upstream honours (False: it went away mid-probe; try again later)."""
        chat = self.info.kind == common_pb2.MODEL_KIND_CHAT

        def post(path: str, body: dict[str, Any], name: str) -> Any:
            return upstream_probe.stream_post(self.client, self.url, path, body, name)

        started = time.monotonic()
        try:
            honoured = await upstream_probe.probe(post, chat, self.upstream_model)
        except httpx.HTTPError as exc:
            log.warning("upstream %s: probing its parameters failed (%s); will retry", self.url, exc)
            return False
        self.capabilities = upstream_probe.capabilities(honoured, chat, self.tokenizer is not None)
        self.info.capabilities.CopyFrom(self.capabilities)
        log.info(
            "upstream %s model %s (probed in %.1f s): %s",
            self.url,
            self.upstream_model,
            time.monotonic() - started,
            upstream_probe.summary(self.capabilities),
        )
        return True

    def _context_from_models(self, body: Any) -> int:
        entries = (body.get("data") or []) if isinstance(body, dict) else []
        entry = next((e for e in entries if e.get("id") == self.upstream_model), entries[0] if entries else None)
        if not isinstance(entry, dict):
            return 0
        meta = entry.get("meta") or {}
        for value in (
            entry.get("max_model_len"),  # vLLM
            entry.get("context_length"),  # SGLang and others
            meta.get("n_ctx"),  # llama.cpp server variants
            meta.get("n_ctx_train"),
        ):
            if isinstance(value, int) and value > 0:
                return value
        return 0

    async def _probe_tokenizer(self) -> Tokenizer | None:
        for tokenizer in TOKENIZERS:
            try:
                if not await self._tokenize_with(tokenizer, "hello", None):
                    continue
            except (httpx.HTTPError, errors.ApiError, ValueError, KeyError, TypeError):
                continue
            try:
                self._tokenizer_overhead = len(await self._tokenize_with(tokenizer, "", None, False))
            except (httpx.HTTPError, errors.ApiError, ValueError, KeyError, TypeError):
                self._tokenizer_overhead = 0
            return tokenizer
        return None

    async def _tokenize_with(
        self,
        tokenizer: Tokenizer,
        text: str | None,
        messages: Sequence[common_pb2.ChatMessage] | None,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        body = tokenizer.tokenize_body(self.upstream_model, text, messages, add_special_tokens)
        response = await self.client.post(self.root + tokenizer.tokenize_path, json=body)
        if not response.is_success:
            raise upstream_error(response.status_code, _json_or_text(response), self.info.name, response.headers)
        tokens = response.json()["tokens"]
        return [int(t) for t in tokens]

    # -- Token counting -----------------------------------------------------

    async def _count(self, text: str | None, messages: Sequence[common_pb2.ChatMessage] | None) -> tuple[int, bool]:
        """(prompt tokens, exact?)."""
        if self.tokenizer is not None:
            try:
                if messages is None:
                    return len(await self._tokenize_with(self.tokenizer, text, None)), True
                if self.tokenizer.renders_chat:
                    return len(await self._tokenize_with(self.tokenizer, None, messages)), True
                # Estimate: the message contents without the chat template's own tokens.
                joined = "\n".join(message_text(m) for m in messages)
                return len(await self._tokenize_with(self.tokenizer, joined, None)), False
            except httpx.HTTPError as exc:
                raise _transport_error(exc) from exc
        # Estimate without a tokenizer: about four characters per token for English text.
        joined = (text or "") if messages is None else "\n".join(message_text(m) for m in messages)
        return len(joined) // 4, False

    async def prepare(self, request: worker_pb2.GenerateRequest) -> Prepared:
        await self._discover()
        refusal = upstream_probe.refusal(request, self.capabilities, self.info.name)
        if refusal is not None:
            raise refusal
        if request.messages:
            if self.info.kind == common_pb2.MODEL_KIND_COMPLETION:
                raise errors.wrong_model_kind(self.info.name, "chat completions")
            count, exact = await self._count(None, request.messages)
            return Prepared(prompt_tokens=count, param="messages", state=exact)
        if request.prompt.HasField("tokens"):
            return Prepared(prompt_tokens=len(request.prompt.tokens.ids), param="prompt", state=True)
        count, exact = await self._count(request.prompt.text, None)
        return Prepared(prompt_tokens=count, param="prompt", state=exact)

    async def tokenize(
        self, prompt: str | None, messages: Sequence[common_pb2.ChatMessage], add_special_tokens: bool | None = None
    ) -> list[int]:
        await self._discover()
        if not self._discovered:
            raise errors.unavailable(f"The upstream of `{self.info.name}` is unreachable.")
        use_messages = prompt is None
        # Ids must be the upstream's own: no estimate here.
        if self.tokenizer is None or (use_messages and not self.tokenizer.renders_chat):
            what = "chat messages" if use_messages and self.tokenizer else "text"
            raise errors.ApiError(
                grpc.StatusCode.UNIMPLEMENTED, f"The upstream of `{self.info.name}` cannot tokenize {what}."
            )
        try:
            return await self._tokenize_with(
                self.tokenizer, prompt, messages if use_messages else None, add_special_tokens
            )
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        await self._discover()
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise errors.ApiError(
                grpc.StatusCode.UNIMPLEMENTED, f"The upstream of `{self.info.name}` cannot detokenize."
            )
        body = tokenizer.detokenize_body(self.upstream_model, token_ids)
        try:
            response = await self.client.post(self.root + tokenizer.detokenize_path, json=body)
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc
        if not response.is_success:
            raise upstream_error(response.status_code, _json_or_text(response), self.info.name, response.headers)
        return str(response.json()[tokenizer.detokenized_key])

    # -- Generation -----------------------------------------------------------

    def _request_body(self, request: worker_pb2.GenerateRequest, max_tokens: int | None) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.upstream_model, "stream": True}
        # Usage at the end when the upstream can (else it is counted: see _read_stream).
        body["stream_options"] = {"include_usage": True}
        body.update(sampling_to_json(request.sampling))
        # Unset (the caller gave none): the upstream's own default, up to its context.
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if request.HasField("response_format") and request.response_format.type:
            body["response_format"] = openai_json.response_format(request.response_format)
        if request.messages:
            body["messages"] = [openai_json.message(m) for m in request.messages]
            if request.logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = request.top_logprobs
            if request.tools:
                body["tools"] = [openai_json.tool(t) for t in request.tools]
            choice = openai_json.tool_choice(request.tool_choice)
            if choice is not None:
                body["tool_choice"] = choice
            return f"{self.url}/chat/completions", body
        if request.prompt.HasField("tokens"):
            body["prompt"] = list(request.prompt.tokens.ids)
        else:
            body["prompt"] = request.prompt.text
        if request.logprobs:
            body["logprobs"] = request.top_logprobs
        if upstream_probe.echo_forwarded(request, self.capabilities):
            body["echo"] = True
        return f"{self.url}/completions", body

    async def generate(
        self, request: worker_pb2.GenerateRequest, prepared: Prepared, max_tokens: int | None, generation: Generation
    ) -> AsyncGenerator[list[Delta], None]:
        # One message per upstream chunk: an upstream streams about one token per chunk, at its pace.
        async for delta in self._deltas(request, max_tokens, generation):
            yield [delta]

    async def _deltas(
        self, request: worker_pb2.GenerateRequest, max_tokens: int | None, generation: Generation
    ) -> AsyncIterator[Delta]:
        url, body = self._request_body(request, max_tokens)
        chat = bool(request.messages)
        echoed = ""  # the prompt text in front of the output, whoever put it there
        if request.echo and not chat:
            if request.prompt.HasField("tokens"):
                echoed = await self.detokenize(request.prompt.tokens.ids)
            else:
                echoed = request.prompt.text
            if not body.get("echo"):  # emulated: exactly what an upstream echo returns
                yield Delta(text=echoed, tokens=0)
        try:
            # Leaving this block for any reason (end, error, cancel, aclose)
            # closes the response, so the upstream sees the disconnect.
            async with self.client.stream("POST", url, json=body) as response:
                if not response.is_success:
                    await response.aread()
                    raise upstream_error(
                        response.status_code, _json_or_text(response), self.info.name, response.headers
                    )
                counting = _Counting(max_tokens, echoed if body.get("echo") else "")
                async for delta in self._read_stream(response, chat, generation, counting):
                    yield delta
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc

    async def _read_stream(
        self, response: httpx.Response, chat: bool, generation: Generation, counting: _Counting
    ) -> AsyncIterator[Delta]:
        finish = ""
        counted = 0  # tokens carried by the deltas yielded so far
        unyielded = 0  # chunks that only carried tool-call fragments
        usage_tokens: int | None = None
        prompt = _UpstreamPrompt()
        calls: dict[int, _ToolCallAcc] = {}
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ": ping" comments, event: lines
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise errors.unavailable(f"upstream sent a malformed event: {data[:200]!r}") from exc
            if "error" in chunk:  # a mid-stream error
                raise _inband_error(chunk, self.info.name)
            if isinstance(chunk.get("usage"), dict) and chunk["usage"].get("completion_tokens") is not None:
                usage_tokens = int(chunk["usage"]["completion_tokens"])
            prompt.read(chunk)
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                if chat:
                    message = choice.get("delta") or {}
                    text = message.get("content") or ""
                    logprobs = openai_json.token_logprobs_from_json(choice.get("logprobs"))
                    for call in message.get("tool_calls") or []:
                        _accumulate(calls, call)
                    if message.get("tool_calls") and not text:
                        generation.produced()
                        unyielded += 1
                else:
                    text = choice.get("text") or ""
                    logprobs = openai_json.legacy_logprobs_from_json(choice.get("logprobs"))
                counting.text.append(text)
                if text or logprobs:
                    # Upstreams stream about one token per chunk.
                    generation.produced()
                    counted += 1
                    yield Delta(text=text, logprobs=logprobs, tokens=1)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        if not finish:
            if done:  # llama-cpp-python does this when another request interrupts the stream
                raise errors.unavailable("upstream ended the stream without a finish_reason (interrupted?)")
            raise errors.unavailable("upstream closed the stream before it finished")
        last = Delta(finish_reason=finish, tokens=unyielded, prompt_tokens=prompt.tokens, cached_tokens=prompt.cached)
        if calls:
            last.finish_reason = "tool_calls"
            last.tool_calls = [
                common_pb2.ToolCall(
                    id=acc.id,
                    type=acc.type,
                    function=common_pb2.FunctionCall(name=acc.name, arguments="".join(acc.arguments)),
                )
                for _, acc in sorted(calls.items())
            ]
        if usage_tokens is None and not calls:
            usage_tokens = await self._count_completion(counting, finish)
        if usage_tokens is not None:
            # Make the worker's sum equal the upstream's own count (the worker
            # adds up Delta.tokens; this may be negative if chunks were partial tokens).
            last.tokens = usage_tokens - counted
        yield last

    async def _count_completion(self, counting: _Counting, finish: str) -> int | None:
        """Completion tokens when the upstream sent no usage (None: keep the chunk count)."""
        if finish == "length" and counting.max_tokens is not None:
            return counting.max_tokens  # cut by max_tokens: exactly that many
        text = "".join(counting.text).removeprefix(counting.echoed)
        if self.tokenizer is None or not text:
            return None if text else 0
        try:
            tokens = await self._tokenize_with(self.tokenizer, text, None, add_special_tokens=False)
            return max(len(tokens) - self._tokenizer_overhead, 0)
        except (httpx.HTTPError, errors.ApiError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not count completion tokens with the upstream's tokenizer: %s", exc)
            return None

    # -- Embeddings -----------------------------------------------------------

    async def embed(
        self, inputs: Sequence[common_pb2.TextOrTokens], dimensions: int | None
    ) -> tuple[list[list[float]], int]:
        if self.info.kind != common_pb2.MODEL_KIND_EMBEDDING:
            raise errors.wrong_model_kind(self.info.name, "embeddings")
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "input": [i.text if i.HasField("text") else list(i.tokens.ids) for i in inputs],
        }
        if dimensions is not None:
            body["dimensions"] = dimensions
        try:
            response = await self.client.post(f"{self.url}/embeddings", json=body)
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc
        if not response.is_success:
            raise upstream_error(response.status_code, _json_or_text(response), self.info.name, response.headers)
        payload = response.json()
        items = sorted(payload.get("data") or [], key=lambda d: d.get("index", 0))
        vectors = [[float(v) for v in item["embedding"]] for item in items]
        tokens = int((payload.get("usage") or {}).get("prompt_tokens") or 0)
        return vectors, tokens


def _accumulate(calls: dict[int, _ToolCallAcc], delta: dict[str, Any]) -> None:
    """Merge one streamed tool-call fragment (OpenAI sends id and name once, arguments in pieces)."""
    acc = calls.setdefault(int(delta.get("index", len(calls))), _ToolCallAcc())
    acc.id = delta.get("id") or acc.id
    acc.type = delta.get("type") or acc.type
    function = delta.get("function") or {}
    acc.name += function.get("name") or ""
    if function.get("arguments"):
        acc.arguments.append(function["arguments"])


def _inband_error(chunk: dict[str, Any], model: str) -> errors.ApiError:
    error = chunk["error"]
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and 400 <= code < 600:
        status = code
    elif isinstance(error, dict) and error.get("type") == "invalid_request_error":
        status = 400
    else:
        status = 500
    return upstream_error(status, chunk, model)


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
