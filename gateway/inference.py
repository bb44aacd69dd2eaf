"""The gateway's domain: OpenAI requests in, worker requests out, OpenAI objects back.

Each choice of a request (``n``, and each prompt of a completion) becomes one
worker ``GenerateRequest``; :mod:`gateway.dispatch` decides where each runs and
merges their messages. This module only builds and assembles.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import shortuuid
from opentelemetry import trace

from common import errors, limits, tracing
from common import sampling as sampling_fields
from common.grpc_server import outgoing_metadata
from common.sampling import Limits, copy_sampling
from common.store import send_deferred
from gateway.auth import current_key
from gateway.dispatch import Dispatcher, current_priority
from gateway.pool import WorkerHandle, WorkerPool
from gateway.routing import Chain, Route, Router, chat_chain, completion_chains
from gateway.validation import check_chat, check_completion, check_embedding
from tokenwire.v1 import api_pb2, common_pb2, worker_pb2

traced = tracing.part("gateway")


def completion_id(prefix: str) -> str:
    return f"{prefix}-{shortuuid.uuid()}"


class Inference:
    def __init__(self, pool: WorkerPool, limits: Limits | None = None, router: Router | None = None) -> None:
        self.pool = pool
        self.dispatch = Dispatcher(pool)
        self.limits = limits or Limits()
        self.router = router  # None: least-loaded dispatch

    async def _chat_route(self, request: api_pb2.CreateChatCompletionRequest, n: int) -> Route | None:
        return await self._route(request.model, lambda: [chat_chain(request)], n)

    async def _route(self, model: str, chains: Callable[[], list[Chain]], n: int) -> Route | None:
        """The request's route, fetched in one round trip to a shared store with its key's admission
        (deferred by gateway/auth.py), which is sent alone when no lookup carries it: before dispatch."""
        route = None if self.router is None else await self.router.fetch_route(model, chains(), n)
        await send_deferred()
        return route

    def _require_kind(self, model: str, generation: bool) -> common_pb2.ModelInfo:
        info = self.pool.model_info(model)
        is_embedding = info.kind == common_pb2.MODEL_KIND_EMBEDDING
        if generation and is_embedding:
            raise errors.wrong_model_kind(model, "chat or text completions")
        if not generation and not is_embedding:
            raise errors.wrong_model_kind(model, "embeddings")
        return info

    # -- chat -------------------------------------------------------------------

    def _chat_requests(self, request: api_pb2.CreateChatCompletionRequest) -> list[worker_pb2.GenerateRequest]:
        with tracing.Block(traced, "admission") as span:
            out = self._admit_chat(request)
            _admitted(span, out)
            return out

    def _admit_chat(self, request: api_pb2.CreateChatCompletionRequest) -> list[worker_pb2.GenerateRequest]:
        check_chat(request, self.limits)
        info = self._require_kind(request.model, generation=True)
        sampling = _sampling(request)
        if request.HasField("max_completion_tokens"):  # it replaces max_tokens (OpenAI's precedence)
            sampling.max_tokens = request.max_completion_tokens
        n = request.n if request.HasField("n") else 1
        out = [
            worker_pb2.GenerateRequest(
                messages=request.messages,
                sampling=_seeded(sampling, i),
                index=i,
                logprobs=request.logprobs,
                top_logprobs=request.top_logprobs,
                response_format=request.response_format,
                tools=request.tools,
                tool_choice=request.tool_choice,
            )
            for i in range(n)
        ]
        limits.check_generate(out[0], info)  # the choices share their prompt and max_tokens
        return out

    async def chat_stream(
        self, request: api_pb2.CreateChatCompletionRequest, timeout: float | None
    ) -> AsyncIterator[api_pb2.StreamChatCompletionResponse]:
        """Chunks as OpenAI streams them; the last one has ``choices: []`` and the usage."""
        requests = self._chat_requests(request)
        chunk_id, created, model = completion_id("chatcmpl"), int(time.time()), request.model
        for r in requests:
            r.request_id = chunk_id

        def chunk(choice: api_pb2.ChatCompletionChunkChoice) -> api_pb2.StreamChatCompletionResponse:
            return api_pb2.StreamChatCompletionResponse(
                id=chunk_id, object="chat.completion.chunk", created=created, model=model, choices=[choice]
            )

        usage = _UsageSum(len(requests))
        route = await self._chat_route(request, len(requests))
        async for response in self.dispatch.choices(model, requests, timeout, stream=True, prefer=route):
            i = response.index
            if response.HasField("accepted"):
                usage.accepted(response)
                delta = api_pb2.ChatCompletionDelta(role="assistant", content="")
                yield chunk(api_pb2.ChatCompletionChunkChoice(index=i, delta=delta))
            output = response.delta
            if output.text or output.logprobs or output.tool_calls:
                choice = api_pb2.ChatCompletionChunkChoice(index=i)
                if output.text:
                    choice.delta.content = output.text
                for k, call in enumerate(output.tool_calls):
                    choice.delta.tool_calls.add(index=k, id=call.id, type=call.type, function=call.function)
                if request.logprobs and output.logprobs:
                    choice.logprobs.content.extend(output.logprobs)
                yield chunk(choice)
            if response.HasField("end"):
                usage.ended(response)
                delta = api_pb2.ChatCompletionDelta()
                yield chunk(
                    api_pb2.ChatCompletionChunkChoice(index=i, delta=delta, finish_reason=response.end.finish_reason)
                )
        yield api_pb2.StreamChatCompletionResponse(
            id=chunk_id, object="chat.completion.chunk", created=created, model=model, usage=usage.total()
        )

    async def chat(
        self, request: api_pb2.CreateChatCompletionRequest, timeout: float | None
    ) -> api_pb2.CreateChatCompletionResponse:
        requests = self._chat_requests(request)
        response_id = completion_id("chatcmpl")
        for r in requests:
            r.request_id = response_id
        choices: list[api_pb2.ChatCompletionChoice] = [api_pb2.ChatCompletionChoice() for _ in requests]
        usage = _UsageSum(len(requests))
        route = await self._chat_route(request, len(requests))
        async for response in self.dispatch.choices(request.model, requests, timeout, stream=False, prefer=route):
            usage.accepted(response)
            usage.ended(response)
            output = response.delta
            choice = choices[response.index]
            choice.index = response.index
            choice.finish_reason = response.end.finish_reason
            choice.message.role = "assistant"
            choice.message.tool_calls.extend(output.tool_calls)
            if output.text or not output.tool_calls:
                choice.message.content = output.text
            if request.logprobs:  # asked for: present, even when empty
                choice.logprobs.content.extend(output.logprobs)
                choice.logprobs.SetInParent()
        return api_pb2.CreateChatCompletionResponse(
            id=response_id,
            object="chat.completion",
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=usage.total(),
        )

    # -- completions --------------------------------------------------------------

    def _completion_requests(self, request: api_pb2.CreateCompletionRequest) -> list[worker_pb2.GenerateRequest]:
        with tracing.Block(traced, "admission") as span:
            out = self._admit_completion(request)
            _admitted(span, out)
            return out

    def _admit_completion(self, request: api_pb2.CreateCompletionRequest) -> list[worker_pb2.GenerateRequest]:
        check_completion(request, self.limits)
        info = self._require_kind(request.model, generation=True)
        sampling = _sampling(request)
        if not request.HasField("max_tokens"):
            sampling.max_tokens = 16  # OpenAI's default for completions
        n = request.n if request.HasField("n") else 1
        out = [
            worker_pb2.GenerateRequest(
                prompt=prompt,
                sampling=_seeded(sampling, i),
                index=p * n + i,
                logprobs=request.HasField("logprobs"),
                top_logprobs=request.logprobs,
                echo=request.echo,
                response_format=request.response_format,
            )
            for p, prompt in enumerate(request.prompt)
            for i in range(n)
        ]
        for choice in out[::n]:  # one per prompt: its choices share it
            limits.check_generate(choice, info)
        return out

    async def _completion_choices(
        self, request: api_pb2.CreateCompletionRequest, timeout: float | None, response_id: str, stream: bool
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """Worker responses of every choice, with text_offset filled in."""
        requests = self._completion_requests(request)
        for r in requests:
            r.request_id = response_id
        offsets = [0] * len(requests)
        n = len(requests) // len(request.prompt)
        route = await self._route(request.model, lambda: completion_chains(request), n)
        async for response in self.dispatch.choices(request.model, requests, timeout, stream, prefer=route):
            for entry in response.delta.logprobs:
                entry.text_offset = offsets[response.index]
                offsets[response.index] += len(entry.token)
            yield response

    @staticmethod
    def _completion_choice(
        request: api_pb2.CreateCompletionRequest, response: worker_pb2.GenerateResponse
    ) -> api_pb2.CompletionChoice:
        choice = api_pb2.CompletionChoice(index=response.index, text=response.delta.text)
        if request.HasField("logprobs"):  # asked for: present, even when empty
            choice.logprobs.content.extend(response.delta.logprobs)
            choice.logprobs.SetInParent()
        if response.HasField("end"):
            choice.finish_reason = response.end.finish_reason
        return choice

    async def completion_stream(
        self, request: api_pb2.CreateCompletionRequest, timeout: float | None
    ) -> AsyncIterator[api_pb2.StreamCompletionResponse]:
        """Chunks as OpenAI streams them; the last one has ``choices: []`` and the usage."""
        response_id, created = completion_id("cmpl"), int(time.time())
        n = request.n if request.HasField("n") else 1
        usage = _UsageSum(len(request.prompt) * n, n)
        async for response in self._completion_choices(request, timeout, response_id, stream=True):
            usage.accepted(response)
            usage.ended(response)
            if response.HasField("delta") or response.HasField("end"):
                yield api_pb2.StreamCompletionResponse(
                    id=response_id,
                    object="text_completion",
                    created=created,
                    model=request.model,
                    choices=[self._completion_choice(request, response)],
                )
        yield api_pb2.StreamCompletionResponse(
            id=response_id, object="text_completion", created=created, model=request.model, usage=usage.total()
        )

    async def completion(
        self, request: api_pb2.CreateCompletionRequest, timeout: float | None
    ) -> api_pb2.CreateCompletionResponse:
        response_id = completion_id("cmpl")
        n = request.n if request.HasField("n") else 1
        choices: dict[int, api_pb2.CompletionChoice] = {}
        usage = _UsageSum(len(request.prompt) * n, n)
        async for response in self._completion_choices(request, timeout, response_id, stream=False):
            usage.accepted(response)
            usage.ended(response)
            choices[response.index] = self._completion_choice(request, response)
        return api_pb2.CreateCompletionResponse(
            id=response_id,
            object="text_completion",
            created=int(time.time()),
            model=request.model,
            choices=[choices[i] for i in sorted(choices)],
            usage=usage.total(),
        )

    # -- embeddings, models, tokens -------------------------------------------------

    async def embed(
        self, request: api_pb2.CreateEmbeddingRequest, timeout: float | None
    ) -> api_pb2.CreateEmbeddingResponse:
        check_embedding(request, self.limits)
        limits.check_embedding_inputs(request.input, self._require_kind(request.model, generation=False))
        worker_request = worker_pb2.EmbedRequest(input=request.input, priority=current_priority.get())
        if request.HasField("dimensions"):
            worker_request.dimensions = request.dimensions
        reply = await self.dispatch.unary(
            request.model, lambda h: h.stub.Embed(worker_request, timeout=timeout, metadata=outgoing_metadata())
        )
        return api_pb2.CreateEmbeddingResponse(
            object="list",
            model=request.model,
            data=[
                api_pb2.Embedding(object="embedding", index=i, embedding=vector.values)
                for i, vector in enumerate(reply.embeddings)
            ],
            usage=common_pb2.Usage(prompt_tokens=reply.prompt_tokens, total_tokens=reply.prompt_tokens),
        )

    def _model(self, name: str, info: common_pb2.ModelInfo, created: int) -> api_pb2.Model:
        return api_pb2.Model(
            id=name,
            object="model",
            created=created,
            owned_by="tokenwire",
            kind=info.kind,
            context_length=info.context_length,
            workers=len(self.pool.workers(name)),
            capabilities=info.capabilities,
        )

    def list_models(self) -> api_pb2.ListModelsResponse:
        models = [
            self._model(name, info, created)
            for name, (info, created) in sorted(self.pool.known_models().items())
            if self.pool.workers(name)
        ]
        return api_pb2.ListModelsResponse(object="list", data=models)

    def get_model(self, name: str) -> api_pb2.GetModelResponse:
        known = self.pool.known_models().get(name)
        if known is None:
            raise errors.model_not_found(name)
        return api_pb2.GetModelResponse(model=self._model(name, *known))

    async def count_tokens(
        self, request: api_pb2.CountTokensRequest, timeout: float | None
    ) -> api_pb2.CountTokensResponse:
        if not request.model:
            raise errors.invalid_request("you must provide a model parameter", "model")
        if bool(request.prompt) == bool(request.messages):
            raise errors.invalid_request("Give exactly one of 'prompt' and 'messages'.", "prompt")
        info = self.pool.model_info(request.model)
        worker_request = worker_pb2.WorkerServiceCountTokensRequest(prompt=request.prompt, messages=request.messages)
        reply = await self.dispatch.unary(
            request.model, lambda h: h.stub.CountTokens(worker_request, timeout=timeout, metadata=outgoing_metadata())
        )
        return api_pb2.CountTokensResponse(count=reply.count, context_length=info.context_length)

    async def tokenize(self, request: api_pb2.TokenizeRequest, timeout: float | None) -> api_pb2.TokenizeResponse:
        if not request.model:
            raise errors.invalid_request("you must provide a model parameter", "model")
        kind = request.WhichOneof("input")
        if kind is None:
            raise errors.invalid_request("Give one of 'prompt' and 'messages'.", "prompt")
        info = self.pool.model_info(request.model)
        chat = kind == "messages"
        if chat and not request.messages.messages:
            raise errors.invalid_request("'messages' must not be empty.", "messages")
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else not chat
        worker_request = worker_pb2.WorkerServiceTokenizeRequest(add_special_tokens=add_special)
        if chat:
            worker_request.messages.CopyFrom(request.messages)
        else:
            worker_request.prompt = request.prompt
        reply = await self.dispatch.unary(
            request.model, lambda h: h.stub.Tokenize(worker_request, timeout=timeout, metadata=outgoing_metadata())
        )
        return api_pb2.TokenizeResponse(
            tokens=reply.token_ids, count=len(reply.token_ids), max_model_len=info.context_length
        )

    async def detokenize(self, request: api_pb2.DetokenizeRequest, timeout: float | None) -> api_pb2.DetokenizeResponse:
        if not request.model:
            raise errors.invalid_request("you must provide a model parameter", "model")
        self.pool.model_info(request.model)
        worker_request = worker_pb2.WorkerServiceDetokenizeRequest(token_ids=request.tokens)
        reply = await self.dispatch.unary(
            request.model, lambda h: h.stub.Detokenize(worker_request, timeout=timeout, metadata=outgoing_metadata())
        )
        return api_pb2.DetokenizeResponse(prompt=reply.text)

    async def check_tokens(
        self, request: api_pb2.CheckTokensRequest, timeout: float | None
    ) -> api_pb2.CheckTokensResponse:
        results = []
        for i, item in enumerate(request.prompts):
            if not item.model:
                raise errors.invalid_request("you must provide a model parameter", f"prompts[{i}].model")
            info = self.pool.model_info(item.model)
            worker_request = worker_pb2.WorkerServiceCountTokensRequest(prompt=item.prompt)

            def count(h: WorkerHandle, r: worker_pb2.WorkerServiceCountTokensRequest = worker_request) -> Any:
                return h.stub.CountTokens(r, timeout=timeout, metadata=outgoing_metadata())

            reply = await self.dispatch.unary(item.model, count)
            fits = reply.count + item.max_tokens <= info.context_length
            results.append(
                api_pb2.TokenCheckResult(fits=fits, token_count=reply.count, context_length=info.context_length)
            )
        return api_pb2.CheckTokensResponse(prompts=results)


class _UsageSum:
    """A request's usage from its choices' messages: each prompt counts once, whatever n is
    (FastChat counted it n times), and every choice's completion tokens."""

    def __init__(self, choices: int, n: int | None = None) -> None:
        self.n = n or choices  # choices per prompt (chat: all of them share one)
        self.prompt = [0] * choices
        self.completion = [0] * choices
        self.cached: list[int | None] = [None] * choices  # None: the worker did not say

    def accepted(self, response: worker_pb2.GenerateResponse) -> None:
        if response.HasField("accepted") and response.index % self.n == 0:
            self.prompt[response.index] = response.accepted.prompt_tokens

    def ended(self, response: worker_pb2.GenerateResponse) -> None:
        if not response.HasField("end"):
            return
        i, usage = response.index, response.end.usage
        self.completion[i] = usage.completion_tokens
        if i % self.n == 0:
            # The end's count is the engine's last word (an upstream's own, template included).
            self.prompt[i] = usage.prompt_tokens or self.prompt[i]
            if usage.HasField("prompt_tokens_details"):
                self.cached[i] = usage.prompt_tokens_details.cached_tokens

    def total(self) -> common_pb2.Usage:
        prompt, completion = sum(self.prompt), sum(self.completion)
        out = common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        if any(c is not None for c in self.cached):
            out.prompt_tokens_details.cached_tokens = sum(c or 0 for c in self.cached)
        return out


# The sampling fields that have a GenAI attribute (gen_ai.request.<name>).
_TRACED_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty")


def _admitted(span: trace.Span, requests: list[worker_pb2.GenerateRequest]) -> None:
    """What admission settled, on its span: the sampling parameters, the choices, the key's label."""
    if not span.is_recording():
        return
    sampling = requests[0].sampling
    attributes: dict[str, str | int | float] = {"gen_ai.request.choice.count": len(requests)}
    attributes.update(
        (f"gen_ai.request.{name}", getattr(sampling, name))
        for name in _TRACED_SAMPLING
        if sampling_fields.is_set(sampling, sampling_fields.BY_NAME[name])
    )
    key = current_key.get()
    if key is not None:
        attributes["tokenwire.api_key"] = key.label  # "key#2": never the key
    span.set_attributes(attributes)


def _sampling(
    request: api_pb2.CreateChatCompletionRequest | api_pb2.CreateCompletionRequest,
) -> worker_pb2.SamplingParams:
    """The request's sampling fields that SamplingParams has (common/sampling.py's table), by name."""
    return copy_sampling(request, worker_pb2.SamplingParams())


def _seeded(sampling: worker_pb2.SamplingParams, index: int) -> worker_pb2.SamplingParams:
    """Choice i of a seeded request uses seed + i: n choices differ, yet repeat."""
    if index == 0 or not sampling.HasField("seed"):
        return sampling
    out = worker_pb2.SamplingParams()
    out.CopyFrom(sampling)
    out.seed = sampling.seed + index
    return out
