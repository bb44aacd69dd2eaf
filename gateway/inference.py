"""The gateway's domain: OpenAI requests in, worker calls out, OpenAI objects back.

Each choice of a request is one ``WorkerService.Generate`` call, dispatched
to the least-loaded live worker of the model; ``n > 1`` and multi-prompt
completions fan out over the pool. A stream commits nothing until every choice
has been accepted by its worker (prompt rendered, context length checked), so
request errors are answered before the first byte.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import shortuuid

from common import errors
from common.grpc_server import outgoing_metadata
from gateway import admission
from gateway.metrics import current_watch
from gateway.pool import WorkerHandle, WorkerPool
from gateway.validation import Limits, check_chat, check_completion, check_embedding
from tokenwire.v1 import api_pb2, common_pb2, worker_pb2

T = TypeVar("T")

# Worker errors that mean "try another worker" when nothing was produced yet.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_MAX_ATTEMPTS = 3


class _ChannelClosed(grpc.aio.AioRpcError):
    """A worker call cut short by its channel closing (the worker left the pool)."""

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "worker channel closed")


def _really_cancelled() -> bool:
    """Whether this task was asked to stop (client gone, deadline, shutdown).

    A grpc.aio call also raises CancelledError when its channel is closed under
    it; that is a worker failure, not a cancellation of ours.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def completion_id(prefix: str) -> str:
    return f"{prefix}-{shortuuid.uuid()}"


class Inference:
    def __init__(self, pool: WorkerPool, limits: Limits | None = None) -> None:
        self.pool = pool
        self.limits = limits or Limits()

    # -- dispatch ---------------------------------------------------------------

    def _require_kind(self, model: str, generation: bool) -> common_pb2.ModelInfo:
        info = self.pool.model_info(model)
        is_embedding = info.kind == common_pb2.MODEL_KIND_EMBEDDING
        if generation and is_embedding:
            raise errors.wrong_model_kind(model, "chat or text completions")
        if not generation and not is_embedding:
            raise errors.wrong_model_kind(model, "embeddings")
        return info

    def _failover(
        self, error: grpc.aio.AioRpcError, handle: WorkerHandle, tried: frozenset[str], attempt: int, model: str
    ) -> frozenset[str]:
        """The workers to skip on the next attempt, or raise ``error`` as ours."""
        if error.code() not in _RETRYABLE or attempt == _MAX_ATTEMPTS:
            raise errors.ApiError.from_rpc_error(error) from None
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self.pool.remove(handle.worker_id)
        tried |= {handle.worker_id}
        if not any(w.worker_id not in tried for w in self.pool.workers(model)):
            raise errors.ApiError.from_rpc_error(error) from None
        return tried

    async def _generate(
        self, model: str, request: worker_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """One choice on one worker. A worker that refuses the call (full), or
        fails before the first token (unreachable, killed), is replaced by
        another one; the caller sees one uninterrupted stream. A buffered
        (non-streamed) choice is one unary GenerateChoice call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if request.buffered:
            # Nobody streams it: one unary call, cheaper than a stream of one message.
            def whole(handle: WorkerHandle) -> Awaitable[worker_pb2.GenerateChoiceResponse]:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
                return handle.stub.GenerateChoice(  # type: ignore[no-any-return]
                    worker_pb2.GenerateChoiceRequest(request=request),
                    timeout=remaining,
                    metadata=outgoing_metadata(),
                )

            yield (await self._unary(model, whole)).choice
            return
        tried: frozenset[str] = frozenset()
        accepted = produced = False
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            handle = self.pool.pick(model, tried)
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            with self.pool.lease(handle):
                call = handle.stub.Generate(request, timeout=remaining, metadata=outgoing_metadata())
                first = True
                try:
                    async for response in call:
                        if first:
                            first = False
                            if accepted:  # a replacement worker: its acceptance is not news
                                continue
                            accepted = True
                        else:
                            produced = True
                        yield response
                    return
                except grpc.aio.AioRpcError as error:
                    if produced:
                        raise errors.ApiError.from_rpc_error(error) from None
                    tried = self._failover(error, handle, tried, attempt, model)
                except asyncio.CancelledError:
                    if _really_cancelled() or produced:
                        raise
                    tried = self._failover(_ChannelClosed(), handle, tried, attempt, model)
                finally:
                    call.cancel()

    async def _unary(self, model: str, call: Callable[[WorkerHandle], Awaitable[T]]) -> T:
        """A unary worker call with the same failover as generation."""
        tried: frozenset[str] = frozenset()
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            handle = self.pool.pick(model, tried)
            with self.pool.lease(handle):
                try:
                    return await call(handle)
                except grpc.aio.AioRpcError as error:
                    tried = self._failover(error, handle, tried, attempt, model)
                except asyncio.CancelledError:
                    if _really_cancelled():
                        raise
                    tried = self._failover(_ChannelClosed(), handle, tried, attempt, model)
        raise AssertionError("unreachable")

    async def _choices(
        self, model: str, requests: list[worker_pb2.GenerateRequest], timeout: float | None
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """All choices, merged as they come; nothing before every choice is accepted."""
        watch = current_watch.get()
        if len(requests) == 1:
            async for response in self._generate(model, requests[0], timeout):
                if watch is not None and response.text:
                    watch.token()
                yield response
            return

        queue: asyncio.Queue[worker_pb2.GenerateResponse | BaseException | None] = asyncio.Queue()

        async def run(request: worker_pb2.GenerateRequest) -> None:
            try:
                async for response in self._generate(model, request, timeout):
                    queue.put_nowait(response)
            except Exception as error:
                queue.put_nowait(error)
            else:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(run(r)) for r in requests]
        try:
            held: list[worker_pb2.GenerateResponse] = []
            accepted: set[int] = set()
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if len(accepted) < len(requests):
                    accepted.add(item.index)
                    held.append(item)
                    if len(accepted) == len(requests):
                        for response in held:
                            yield response
                        held.clear()
                    continue
                if watch is not None and item.text:
                    watch.token()
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- chat -------------------------------------------------------------------

    def _chat_requests(
        self, request: api_pb2.CreateChatCompletionRequest, buffered: bool
    ) -> list[worker_pb2.GenerateRequest]:
        check_chat(request, self.limits)
        admission.check_chat(request, self._require_kind(request.model, generation=True))
        sampling = _sampling(request)
        if request.HasField("max_completion_tokens"):
            sampling.max_tokens = request.max_completion_tokens
        n = request.n if request.HasField("n") else 1
        out = []
        for i in range(n):
            choice_sampling = _seeded(sampling, i)
            out.append(
                worker_pb2.GenerateRequest(
                    messages=request.messages,
                    sampling=choice_sampling,
                    index=i,
                    logprobs=request.logprobs,
                    top_logprobs=request.top_logprobs,
                    response_format=request.response_format,
                    tools=request.tools,
                    tool_choice=request.tool_choice,
                    buffered=buffered,
                )
            )
        return out

    async def chat_stream(
        self, request: api_pb2.CreateChatCompletionRequest, timeout: float | None
    ) -> AsyncIterator[api_pb2.StreamChatCompletionResponse]:
        """Chunks as OpenAI streams them; the last one has ``choices: []`` and the usage."""
        requests = self._chat_requests(request, buffered=False)
        chunk_id, created, model = completion_id("chatcmpl"), int(time.time()), request.model
        for r in requests:
            r.request_id = chunk_id

        def chunk(**fields: object) -> api_pb2.StreamChatCompletionResponse:
            return api_pb2.StreamChatCompletionResponse(
                id=chunk_id, object="chat.completion.chunk", created=created, model=model, **fields
            )

        prompt_tokens = 0
        completion_tokens = [0] * len(requests)
        started: set[int] = set()
        async for response in self._choices(model, requests, timeout):
            i = response.index
            if i not in started:
                started.add(i)
                prompt_tokens = response.usage.prompt_tokens
                delta = api_pb2.ChatCompletionDelta(role="assistant", content="")
                yield chunk(choices=[api_pb2.ChatCompletionChunkChoice(index=i, delta=delta)])
                continue
            completion_tokens[i] = response.usage.completion_tokens
            if response.text or response.logprobs or response.tool_calls:
                choice = api_pb2.ChatCompletionChunkChoice(index=i)
                if response.text:
                    choice.delta.content = response.text
                for k, call in enumerate(response.tool_calls):
                    choice.delta.tool_calls.add(index=k, id=call.id, type=call.type, function=call.function)
                if request.logprobs:
                    choice.logprobs.content.extend(response.logprobs)
                yield chunk(choices=[choice])
            if response.finish_reason:
                yield chunk(
                    choices=[
                        api_pb2.ChatCompletionChunkChoice(
                            index=i, delta=api_pb2.ChatCompletionDelta(), finish_reason=response.finish_reason
                        )
                    ]
                )
        total = sum(completion_tokens)
        yield chunk(
            usage=common_pb2.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=total, total_tokens=prompt_tokens + total
            )
        )

    async def chat(
        self, request: api_pb2.CreateChatCompletionRequest, timeout: float | None
    ) -> api_pb2.CreateChatCompletionResponse:
        requests = self._chat_requests(request, buffered=True)
        response_id = completion_id("chatcmpl")
        for r in requests:
            r.request_id = response_id
        choices = [
            api_pb2.ChatCompletionChoice(index=i, message=api_pb2.ChatCompletionMessage(role="assistant"))
            for i in range(len(requests))
        ]
        texts: list[list[str]] = [[] for _ in requests]
        prompt_tokens = 0
        completion_tokens = [0] * len(requests)
        async for response in self._choices(request.model, requests, timeout):
            i = response.index
            prompt_tokens = response.usage.prompt_tokens
            completion_tokens[i] = response.usage.completion_tokens
            texts[i].append(response.text)
            if request.logprobs:
                choices[i].logprobs.content.extend(response.logprobs)
            choices[i].message.tool_calls.extend(response.tool_calls)
            if response.finish_reason:
                choices[i].finish_reason = response.finish_reason
        for choice, parts in zip(choices, texts, strict=True):
            text = "".join(parts)
            if text or not choice.message.tool_calls:
                choice.message.content = text
        total = sum(completion_tokens)
        return api_pb2.CreateChatCompletionResponse(
            id=response_id,
            object="chat.completion",
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=common_pb2.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=total, total_tokens=prompt_tokens + total
            ),
        )

    # -- completions --------------------------------------------------------------

    def _completion_requests(
        self, request: api_pb2.CreateCompletionRequest, buffered: bool
    ) -> list[worker_pb2.GenerateRequest]:
        check_completion(request, self.limits)
        admission.check_completion(request, self._require_kind(request.model, generation=True))
        sampling = _sampling(request)
        if not request.HasField("max_tokens"):
            sampling.max_tokens = 16  # OpenAI's default for completions
        n = request.n if request.HasField("n") else 1
        out = []
        for p, prompt in enumerate(request.prompt):
            for i in range(n):
                out.append(
                    worker_pb2.GenerateRequest(
                        prompt=prompt,
                        sampling=_seeded(sampling, i),
                        index=p * n + i,
                        logprobs=request.HasField("logprobs"),
                        top_logprobs=request.logprobs,
                        echo=request.echo,
                        response_format=request.response_format,
                        buffered=buffered,
                    )
                )
        return out

    async def _completion_choices(
        self, request: api_pb2.CreateCompletionRequest, timeout: float | None, response_id: str, buffered: bool
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """Worker responses of every choice, with text_offset filled in."""
        requests = self._completion_requests(request, buffered)
        for r in requests:
            r.request_id = response_id
        offsets = [0] * len(requests)
        async for response in self._choices(request.model, requests, timeout):
            for entry in response.logprobs:
                entry.text_offset = offsets[response.index]
                offsets[response.index] += len(entry.token)
            yield response

    @staticmethod
    def _completion_usage(prompt_tokens: dict[int, int], completion_tokens: dict[int, int], n: int) -> common_pb2.Usage:
        # Each prompt counts once, whatever n is (FastChat counted it n times).
        prompt = sum(tokens for index, tokens in prompt_tokens.items() if index % n == 0)
        completion = sum(completion_tokens.values())
        return common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def completion_stream(
        self, request: api_pb2.CreateCompletionRequest, timeout: float | None
    ) -> AsyncIterator[api_pb2.StreamCompletionResponse]:
        """Chunks as OpenAI streams them; the last one has ``choices: []`` and the usage."""
        response_id, created = completion_id("cmpl"), int(time.time())
        n = request.n if request.HasField("n") else 1
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        async for response in self._completion_choices(request, timeout, response_id, buffered=False):
            if response.index not in prompt_tokens:  # the "accepted" message
                prompt_tokens[response.index] = response.usage.prompt_tokens
                continue
            completion_tokens[response.index] = response.usage.completion_tokens
            choice = api_pb2.CompletionChoice(index=response.index, text=response.text)
            if request.HasField("logprobs"):
                choice.logprobs.content.extend(response.logprobs)
            if response.finish_reason:
                choice.finish_reason = response.finish_reason
            yield api_pb2.StreamCompletionResponse(
                id=response_id, object="text_completion", created=created, model=request.model, choices=[choice]
            )
        yield api_pb2.StreamCompletionResponse(
            id=response_id,
            object="text_completion",
            created=created,
            model=request.model,
            usage=self._completion_usage(prompt_tokens, completion_tokens, n),
        )

    async def completion(
        self, request: api_pb2.CreateCompletionRequest, timeout: float | None
    ) -> api_pb2.CreateCompletionResponse:
        response_id = completion_id("cmpl")
        n = request.n if request.HasField("n") else 1
        choices: dict[int, api_pb2.CompletionChoice] = {}
        texts: dict[int, list[str]] = {}
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        async for response in self._completion_choices(request, timeout, response_id, buffered=True):
            i = response.index
            if i not in choices:
                choices[i] = api_pb2.CompletionChoice(index=i)
                texts[i] = []
            prompt_tokens[i] = response.usage.prompt_tokens
            completion_tokens[i] = response.usage.completion_tokens
            texts[i].append(response.text)
            if request.HasField("logprobs"):
                choices[i].logprobs.content.extend(response.logprobs)
            if response.finish_reason:
                choices[i].finish_reason = response.finish_reason
        for i, choice in choices.items():
            choice.text = "".join(texts[i])
        return api_pb2.CreateCompletionResponse(
            id=response_id,
            object="text_completion",
            created=int(time.time()),
            model=request.model,
            choices=[choices[i] for i in sorted(choices)],
            usage=self._completion_usage(prompt_tokens, completion_tokens, n),
        )

    # -- embeddings, models, tokens -------------------------------------------------

    async def embed(
        self, request: api_pb2.CreateEmbeddingRequest, timeout: float | None
    ) -> api_pb2.CreateEmbeddingResponse:
        check_embedding(request, self.limits)
        admission.check_embedding(request, self._require_kind(request.model, generation=False))
        worker_request = worker_pb2.EmbedRequest(input=request.input)
        if request.HasField("dimensions"):
            worker_request.dimensions = request.dimensions
        reply = await self._unary(
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
        reply = await self._unary(
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
        reply = await self._unary(
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
        reply = await self._unary(
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
            reply = await self._unary(
                item.model,
                lambda h, r=worker_request: h.stub.CountTokens(r, timeout=timeout, metadata=outgoing_metadata()),
            )
            fits = reply.count + item.max_tokens <= info.context_length
            results.append(
                api_pb2.TokenCheckResult(fits=fits, token_count=reply.count, context_length=info.context_length)
            )
        return api_pb2.CheckTokensResponse(prompts=results)


def _sampling(
    request: api_pb2.CreateChatCompletionRequest | api_pb2.CreateCompletionRequest,
) -> worker_pb2.SamplingParams:
    sampling = worker_pb2.SamplingParams(stop=request.stop, logit_bias=request.logit_bias)
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "max_tokens",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
    ):
        if request.HasField(name):
            setattr(sampling, name, getattr(request, name))
    return sampling


def _seeded(sampling: worker_pb2.SamplingParams, index: int) -> worker_pb2.SamplingParams:
    """Choice i of a seeded request uses seed + i: n choices differ, yet repeat."""
    if index == 0 or not sampling.HasField("seed"):
        return sampling
    out = worker_pb2.SamplingParams()
    out.CopyFrom(sampling)
    out.seed = sampling.seed + index
    return out
