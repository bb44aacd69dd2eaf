"""InferenceService: thin gRPC handlers over :class:`gateway.inference.Inference`.

Each handler runs inside :func:`Observed`, which times the request, counts
it by model and status, and writes its one log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc

from common import observability as obs
from common import tracing
from common.errors import ApiError
from gateway import cluster_status, metrics, routing
from gateway.auth import current_key
from gateway.inference import Inference
from gateway.rate_limits import RateLimiter
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

log = logging.getLogger("tokenwire.gateway")
traced = tracing.part("gateway")
# gen_ai.operation.name of each kind of request (OpenTelemetry's GenAI conventions).
OPERATIONS = {
    "chat": "chat",
    "chat_stream": "chat",
    "completion": "text_completion",
    "completion_stream": "text_completion",
    "embedding": "embeddings",
}


class Observed:
    """Metrics and the log line of one API request."""

    def __init__(self, inference: Inference, kind: str, model: str) -> None:
        # Only served model names become label values (bounded cardinality).
        self.kind = kind
        self.model = model if model in inference.pool.known_models() else "unknown"
        self.requested = model
        self.usage: common_pb2.Usage | None = None
        self.watch = metrics.Stopwatch(self.model)
        self.routes: list[routing.Decision] = []

    def __enter__(self) -> Observed:
        # Token timing exists only where tokens are streamed: a non-streamed
        # choice comes from its worker in one message.
        metrics.current_watch.set(self.watch if self.kind.endswith("_stream") else None)
        routing.current_decisions.set(self.routes)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        status = "ok"
        if isinstance(error, ApiError):
            status = error.code or error.type
            metrics.ERRORS.labels(self.model, status).inc()
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            status = "cancelled"
            metrics.CANCELLED.labels(self.model).inc()
        elif error is not None:
            status = "internal_error"
            metrics.ERRORS.labels(self.model, status).inc()
        elapsed = self.watch.elapsed()
        metrics.REQUESTS.labels(self.kind, self.model, status).inc()
        metrics.E2E.labels(self.kind, self.model).observe(elapsed)
        fields: dict[str, object] = {"kind": self.kind, "model": self.requested, "status": status}
        if self.usage is not None:
            metrics.PROMPT_TOKENS.labels(self.model).inc(self.usage.prompt_tokens)
            metrics.COMPLETION_TOKENS.labels(self.model).inc(self.usage.completion_tokens)
            fields["prompt_tokens"] = self.usage.prompt_tokens
            fields["completion_tokens"] = self.usage.completion_tokens
        if self.routes:  # each choice's worker: address, reason, tokens matched (cache-aware routing)
            fields["route"] = ",".join(f"{d.worker}:{d.reason}:{d.matched_tokens}" for d in self.routes)
        if self.watch.first is not None:
            fields["ttft_ms"] = round((self.watch.first - self.watch.start) * 1000, 1)
        fields["latency_ms"] = round(elapsed * 1000, 1)
        obs.log_request(log, "request", **fields)
        if traced.on:
            self._trace()

    def _trace(self) -> None:
        """The request's figures on its span (the call's server span, which has its status), by
        OpenTelemetry's GenAI names."""
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": OPERATIONS[self.kind],
            "gen_ai.request.model": self.requested,
        }
        if self.usage is not None:
            attributes["gen_ai.usage.input_tokens"] = self.usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = self.usage.completion_tokens
        tracing.set_on_current_span(traced, attributes)


class InferenceServicer(api_pb2_grpc.InferenceServiceServicer):
    def __init__(self, inference: Inference, limiter: RateLimiter) -> None:
        self.inference = inference
        self.limiter = limiter

    def _count(self, usage: common_pb2.Usage) -> None:
        """The key's tokens, counted as the response leaves (a store's write is sent in the background)."""
        key = current_key.get()
        if key is not None:
            self.limiter.record(key, usage.total_tokens)

    async def _unary(self, kind: str, request: Any, serve: Callable[..., Awaitable[Any]], context: Any) -> Any:
        with Observed(self.inference, kind, request.model) as observed:
            reply = await serve(request, context.time_remaining())
            observed.usage = reply.usage
            self._count(reply.usage)
            return reply

    async def _stream(
        self, kind: str, request: Any, serve: Callable[..., AsyncIterator[Any]], context: Any
    ) -> AsyncIterator[Any]:
        with Observed(self.inference, kind, request.request.model) as observed:
            async for chunk in serve(request.request, context.time_remaining()):
                if chunk.HasField("usage"):  # the last chunk
                    observed.usage = chunk.usage
                    self._count(chunk.usage)
                    if not request.stream_options.include_usage:
                        continue
                yield chunk

    async def ListModels(
        self, request: api_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListModelsResponse:
        return self.inference.list_models()

    async def GetModel(
        self, request: api_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GetModelResponse:
        return self.inference.get_model(request.model)

    async def CreateChatCompletion(
        self, request: api_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CreateChatCompletionResponse:
        return await self._unary("chat", request, self.inference.chat, context)

    def StreamChatCompletion(
        self, request: api_pb2.StreamChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.StreamChatCompletionResponse]:
        return self._stream("chat_stream", request, self.inference.chat_stream, context)

    async def CreateCompletion(
        self, request: api_pb2.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CreateCompletionResponse:
        return await self._unary("completion", request, self.inference.completion, context)

    def StreamCompletion(
        self, request: api_pb2.StreamCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.StreamCompletionResponse]:
        return self._stream("completion_stream", request, self.inference.completion_stream, context)

    async def CreateEmbedding(
        self, request: api_pb2.CreateEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CreateEmbeddingResponse:
        return await self._unary("embedding", request, self.inference.embed, context)

    async def CheckTokens(
        self, request: api_pb2.CheckTokensRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CheckTokensResponse:
        return await self.inference.check_tokens(request, context.time_remaining())

    async def CountTokens(
        self, request: api_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CountTokensResponse:
        return await self.inference.count_tokens(request, context.time_remaining())

    async def GetStatus(
        self, request: api_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GetStatusResponse:
        return await cluster_status.pool_status(self.inference.pool)

    async def Tokenize(
        self, request: api_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.TokenizeResponse:
        return await self.inference.tokenize(request, context.time_remaining())

    async def Detokenize(
        self, request: api_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DetokenizeResponse:
        return await self.inference.detokenize(request, context.time_remaining())
