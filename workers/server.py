"""The model worker: one engine behind WorkerService, registered with a registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from common import addresses, errors, limits, tracing
from common import observability as obs
from common.grpc_server import GrpcServer
from tokenwire.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from workers import admission, metrics
from workers.engine import BatchStats, Delta, Engine, Generation
from workers.registration import RegistryLink
from workers.slots import Slots
from workers.spans import ChoiceSpans

log = logging.getLogger("tokenwire.worker")
traced = tracing.part("worker")


class WorkerStats:
    def __init__(self) -> None:
        self.requests_total = 0
        self.cancelled_total = 0
        self.tokens_after_cancel_total = 0
        self.tokens_after_cancel_max = 0

    def record_cancel(self, generation: Generation) -> None:
        self.cancelled_total += 1
        self.tokens_after_cancel_total += generation.tokens_after_cancel
        self.tokens_after_cancel_max = max(self.tokens_after_cancel_max, generation.tokens_after_cancel)


class _Choice:
    """One choice's messages, and what it has made so far (for its end and its log line)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens: int | None = None  # unknown until the engine says
        self.finish = ""

    def accepted(self, prompt_tokens: int) -> worker_pb2.GenerateResponse:
        self.prompt_tokens = prompt_tokens
        return worker_pb2.GenerateResponse(
            index=self.index, accepted=worker_pb2.GenerateAccepted(prompt_tokens=prompt_tokens)
        )

    def message(self, deltas: list[Delta]) -> worker_pb2.GenerateResponse:
        """One message for these deltas, with the end when the last one has it."""
        response = worker_pb2.GenerateResponse(index=self.index)
        delta = response.delta
        for d in deltas:
            delta.completion_tokens += d.token_count
            delta.token_ids.extend(d.token_ids)
            delta.logprobs.extend(d.logprobs)
            delta.tool_calls.extend(d.tool_calls)
            self.finish = d.finish_reason or self.finish
            if d.prompt_tokens is not None:
                self.prompt_tokens = d.prompt_tokens
            if d.cached_tokens is not None:
                self.cached_tokens = d.cached_tokens
        delta.text = "".join(d.text for d in deltas)
        self.completion_tokens += delta.completion_tokens
        if self.finish:
            response.end.finish_reason = self.finish
            usage = response.end.usage
            usage.prompt_tokens, usage.completion_tokens = self.prompt_tokens, self.completion_tokens
            usage.total_tokens = self.prompt_tokens + self.completion_tokens
            if self.cached_tokens is not None:
                usage.prompt_tokens_details.cached_tokens = self.cached_tokens
        return response


def _is_batch(priority: int) -> bool:
    return priority == worker_pb2.PRIORITY_BATCH


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: Engine, slots: Slots, stream_interval: int = 1) -> None:
        self.engine = engine
        self.slots = slots
        self.stream_interval = stream_interval
        self.stats = WorkerStats()
        self.model = engine.info.name
        metrics.ENGINE_IN_FLIGHT.labels(self.model).set_function(lambda: slots.in_flight)
        metrics.ENGINE_QUEUE.labels(self.model).set_function(lambda: slots.waiting)
        batch = engine.batch_stats()
        if batch is not None:
            _batch_metrics(self.model, batch)

    def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        return self._generate(request, Generation())

    async def GenerateChoice(
        self, request: worker_pb2.GenerateChoiceRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GenerateChoiceResponse:
        # Run to the end (not closed after the message), so it counts as finished.
        (choice,) = [message async for message in self._generate(request.request, Generation(whole=True))]
        return worker_pb2.GenerateChoiceResponse(choice=choice)

    async def _generate(
        self, request: worker_pb2.GenerateRequest, generation: Generation
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        if self.engine.info.kind == common_pb2.MODEL_KIND_EMBEDDING:
            raise errors.wrong_model_kind(self.engine.info.name, "text generation")
        self.stats.requests_total += 1
        started = time.perf_counter()
        status = "ok"
        choice = _Choice(request.index)
        spans = ChoiceSpans(self.model)
        try:
            limits.check_generate(request, self.engine.info)  # before a slot, before tokenizing
            async with contextlib.AsyncExitStack() as stack:
                spans.begin("queue")
                await stack.enter_async_context(self.slots.acquire(_is_batch(request.priority)))
                spans.begin("tokenize")
                prepared = await self.engine.prepare(request)
                max_tokens = admission.resolve_max_tokens(self.engine, request, prepared.prompt_tokens, prepared.param)
                accepted = choice.accepted(prepared.prompt_tokens)
                spans.begin("prefill", {"gen_ai.usage.input_tokens": prepared.prompt_tokens})
                # Closed as soon as we stop (an engine's sequence must leave its batch then, not at
                # garbage collection).
                ready = await stack.enter_async_context(
                    contextlib.aclosing(spans.captured(self.engine.generate(request, prepared, max_tokens, generation)))
                )
                if generation.whole:
                    # Not streamed to anyone: the whole choice in one message.
                    first: list[Delta] = await anext(ready, [])  # the prompt is evaluated
                    spans.begin("decode")
                    whole = choice.message([*first, *[delta async for deltas in ready for delta in deltas]])
                    whole.accepted.CopyFrom(accepted.accepted)
                    yield whole
                else:
                    # The gateway commits a response (HTTP 200) only once it has seen this.
                    yield accepted
                    # One message per list the engine hands over, except that each but the first
                    # and the last waits until it carries --stream-interval tokens.
                    pending: list[Delta] = await anext(ready, [])  # the prompt is evaluated
                    spans.begin("decode")
                    if pending:
                        yield choice.message(pending)
                        pending = []
                    async for deltas in ready:
                        pending += deltas
                        if pending[-1].finish_reason or sum(d.token_count for d in pending) >= self.stream_interval:
                            yield choice.message(pending)
                            pending = []
                    if pending:
                        yield choice.message(pending)
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            generation.cancelled.set()
            self.stats.record_cancel(generation)
            metrics.ENGINE_CANCELLED.labels(self.model).inc()
            metrics.ENGINE_AFTER_CANCEL.labels(self.model).inc(generation.tokens_after_cancel)
            raise
        except errors.ApiError as error:
            status = error.code or error.type
            raise
        except Exception:
            status = "internal_error"
            raise
        finally:
            spans.end(
                request, choice.prompt_tokens, choice.cached_tokens, choice.completion_tokens, choice.finish, status
            )
            metrics.ENGINE_REQUESTS.labels(self.model, "generate", status).inc()
            metrics.ENGINE_TOKENS.labels(self.model).inc(generation.tokens)
            if choice.finish:
                metrics.ENGINE_PROMPT_TOKENS.labels(self.model).inc(choice.prompt_tokens)
                metrics.ENGINE_CACHED_TOKENS.labels(self.model).inc(choice.cached_tokens or 0)
            obs.log_request(
                log,
                "generate",
                status=status,
                finish_reason=choice.finish or "-",
                prompt_tokens=choice.prompt_tokens,
                cached_tokens="-" if choice.cached_tokens is None else choice.cached_tokens,
                completion_tokens=choice.completion_tokens,
                generated=generation.tokens,
                after_cancel=generation.tokens_after_cancel,
                latency_ms=round((time.perf_counter() - started) * 1000, 1),
            )

    async def Embed(
        self, request: worker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EmbedResponse:
        self.stats.requests_total += 1
        status = "ok"
        try:
            limits.check_embedding_inputs(request.input, self.engine.info)
            async with self.slots.acquire(_is_batch(request.priority)):
                dimensions = request.dimensions if request.HasField("dimensions") else None
                vectors, tokens = await self.engine.embed(request.input, dimensions)
        except errors.ApiError as error:
            status = error.code or error.type
            raise
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            metrics.ENGINE_REQUESTS.labels(self.model, "embed", status).inc()
        return worker_pb2.EmbedResponse(
            embeddings=[worker_pb2.EmbeddingVector(values=v) for v in vectors], prompt_tokens=tokens
        )

    async def CountTokens(
        self, request: worker_pb2.WorkerServiceCountTokensRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerServiceCountTokensResponse:
        ids = await self.engine.tokenize(request.prompt if not request.messages else None, request.messages)
        return worker_pb2.WorkerServiceCountTokensResponse(count=len(ids), token_ids=ids)

    async def Tokenize(
        self, request: worker_pb2.WorkerServiceTokenizeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerServiceTokenizeResponse:
        chat = request.WhichOneof("input") == "messages"
        ids = await self.engine.tokenize(
            None if chat else request.prompt, request.messages.messages, request.add_special_tokens
        )
        return worker_pb2.WorkerServiceTokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: worker_pb2.WorkerServiceDetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerServiceDetokenizeResponse:
        return worker_pb2.WorkerServiceDetokenizeResponse(text=await self.engine.detokenize(request.token_ids))

    async def GetModelInfo(
        self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetModelInfoResponse:
        return worker_pb2.GetModelInfoResponse(model=self.engine.info)

    async def GetStats(
        self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetStatsResponse:
        s = self.stats
        return worker_pb2.GetStatsResponse(
            in_flight=self.slots.in_flight,
            queue_length=self.slots.waiting,
            capacity=self.slots.capacity,
            requests_total=s.requests_total,
            cancelled_total=s.cancelled_total,
            tokens_after_cancel_total=s.tokens_after_cancel_total,
            tokens_after_cancel_max=s.tokens_after_cancel_max,
            **_batch_fields(self.engine.batch_stats()),
        )


def _batch_fields(batch: BatchStats | None) -> dict[str, int]:
    if batch is None:
        return {}
    return {
        "running_sequences": batch.running,
        "parallel": batch.parallel,
        "waiting_sequences": batch.waiting,
        "decode_steps": batch.steps,
        "step_tokens_total": batch.step_tokens_total,
        "max_sequences_per_step": batch.max_sequences_per_step,
        "max_tokens_per_step": batch.max_tokens_per_step,
        "prompt_tokens_evaluated": batch.prompt_tokens_evaluated,
        "prompt_tokens_reused": batch.prompt_tokens_reused,
        "kv_cells_in_use": batch.kv_cells_in_use,
        "kv_cells_cached": batch.kv_cells_cached,
        "kv_exhausted_total": batch.kv_exhausted_total,
        "prompt_cache_bytes": batch.prompt_cache_bytes,
    }


def _batch_metrics(model: str, batch: BatchStats) -> None:
    metrics.ENGINE_RUNNING.labels(model).set_function(lambda: batch.running)
    metrics.ENGINE_WAITING.labels(model).set_function(lambda: batch.waiting)
    metrics.ENGINE_PROMPT_EVALUATED.labels(model).set_function(lambda: batch.prompt_tokens_evaluated)
    metrics.ENGINE_PROMPT_REUSED.labels(model).set_function(lambda: batch.prompt_tokens_reused)
    metrics.ENGINE_BATCH_PREEMPTED.labels(model).set_function(lambda: batch.batch_preempted_total)
    metrics.ENGINE_BATCH_STEPS_ABORTED.labels(model).set_function(lambda: batch.batch_steps_aborted_total)
    metrics.ENGINE_KV_IN_USE.labels(model).set_function(lambda: batch.kv_cells_in_use)
    metrics.ENGINE_KV_CACHED.labels(model).set_function(lambda: batch.kv_cells_cached)
    metrics.ENGINE_PROMPT_CACHE_BYTES.labels(model).set_function(lambda: batch.prompt_cache_bytes)
    tokens = metrics.ENGINE_STEP_TOKENS.labels(model)
    sequences = metrics.ENGINE_STEP_SEQUENCES.labels(model)

    def observe(n_sequences: int, n_tokens: int) -> None:
        tokens.observe(n_tokens)
        sequences.observe(n_sequences)

    batch.on_step.append(observe)


async def run_worker(
    engine: Engine,
    *,
    host: str,
    port: int,
    controller_address: str,
    worker_address: str | None = None,
    limit_worker_concurrency: int = 5,
    max_queue: int = 128,
    reserved_slots: int = 1,
    preempt_batch: bool = False,
    stream_interval: int = 1,
    heartbeat_interval: float = 5.0,
    shutdown_grace: float = 10.0,
    metrics_port: int | None = None,
    tls: grpc.ServerCredentials | None = None,
    stop: asyncio.Event,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Load the model, serve WorkerService, register, and run until ``stop``."""
    slots = Slots(limit_worker_concurrency, max_queue, reserved_slots, preempt_batch)
    servicer = WorkerServicer(engine, slots, stream_interval)
    server = GrpcServer(
        [(worker_pb2_grpc.add_WorkerServiceServicer_to_server, servicer, "tokenwire.v1.WorkerService")],
        traced=traced,
    )
    bound = server.bind(f"{host}:{port}", tls)
    await server.start()
    # NOT_SERVING while the model loads.
    await server.set_serving(False)
    if metrics_port is not None:
        obs.serve_metrics(host, metrics_port, metrics.REGISTRY)
    started = time.monotonic()
    log.info("loading model %s (%s engine)", engine.info.name, engine.info.engine)
    await engine.start()
    log.info("model %s loaded in %.1f s", engine.info.name, time.monotonic() - started)
    await server.set_serving(True)
    address = worker_address or addresses.local(host, bound)
    link = RegistryLink(controller_address, address, engine.info, slots, interval=heartbeat_interval)
    link.start()
    log.info("worker for %s serving on %s, registering with %s", engine.info.name, address, controller_address)
    if on_ready is not None:
        on_ready(bound)
    try:
        await stop.wait()
    finally:
        log.info("worker %s shutting down", address)
        # Leave the registry first so no new request is routed here.
        await link.stop()
        await server.stop(shutdown_grace)
        await engine.close()
