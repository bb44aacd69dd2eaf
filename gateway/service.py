"""InferenceService: thin gRPC handlers over :class:`gateway.inference.Inference`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from gateway.inference import Inference
from tokenwire.v1 import api_pb2, api_pb2_grpc


class InferenceServicer(api_pb2_grpc.InferenceServiceServicer):
    def __init__(self, inference: Inference) -> None:
        self.inference = inference

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
        return await self.inference.chat(request, context.time_remaining())

    async def StreamChatCompletion(
        self, request: api_pb2.StreamChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.StreamChatCompletionResponse]:
        stream = self.inference.chat_stream(
            request.request, request.stream_options.include_usage, context.time_remaining()
        )
        async for chunk in stream:
            yield chunk

    async def CreateCompletion(
        self, request: api_pb2.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CreateCompletionResponse:
        return await self.inference.completion(request, context.time_remaining())

    async def StreamCompletion(
        self, request: api_pb2.StreamCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.StreamCompletionResponse]:
        stream = self.inference.completion_stream(
            request.request, request.stream_options.include_usage, context.time_remaining()
        )
        async for chunk in stream:
            yield chunk

    async def CreateEmbedding(
        self, request: api_pb2.CreateEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CreateEmbeddingResponse:
        return await self.inference.embed(request, context.time_remaining())

    async def CheckTokens(
        self, request: api_pb2.CheckTokensRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CheckTokensResponse:
        return await self.inference.check_tokens(request, context.time_remaining())

    async def CountTokens(
        self, request: api_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CountTokensResponse:
        return await self.inference.count_tokens(request, context.time_remaining())
