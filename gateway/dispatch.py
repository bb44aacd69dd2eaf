"""Dispatch: which worker runs a call, what happens when it fails, and fan-out.

- **pick**: the least-loaded live worker of the model (ties broken at random),
  from the pool's view; no control round trip per request. A request may bring
  a :class:`Preference` (cache-aware routing, gateway/routing.py) that chooses
  among the same candidates instead; failover still skips the workers tried.
- **lease**: a call counts in its worker's in-flight load while it runs.
- **failover**: a worker that refuses a call (full) or fails before producing
  anything (unreachable, killed) is replaced by another, up to three attempts;
  the caller sees one uninterrupted call. A worker a call could not reach
  (gRPC's own UNAVAILABLE, before or after it produced; not the worker's own
  answer, such as an openai engine's upstream being down) leaves dispatch until
  it answers a health probe (``WorkerHandle.mark_unreachable``).
- **accepted**: a worker says so in a message of its own (``accepted``: prompt
  rendered, context checked). A fan-out yields nothing until every choice is
  accepted, so request errors are answered before the first byte of a response.

A non-streamed choice is one unary ``GenerateChoice`` call: cheaper than a
stream of one message, and the worker hands the choice over once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

import grpc
from opentelemetry import trace

from common import errors, tracing
from common.grpc_server import outgoing_metadata, really_cancelled
from gateway.metrics import current_watch
from gateway.pool import WorkerHandle, WorkerPool, least_loaded
from tokenwire.v1 import worker_pb2

T = TypeVar("T")
log = logging.getLogger("tokenwire.gateway")

# The tier of the request being served: the batch runner sets PRIORITY_BATCH,
# and every worker call it makes carries it (workers/slots.py honours it).
current_priority: contextvars.ContextVar[worker_pb2.Priority.ValueType] = contextvars.ContextVar(
    "current_priority", default=worker_pb2.PRIORITY_UNSPECIFIED
)

# Worker errors that mean "try another worker" when nothing was produced yet.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
MAX_ATTEMPTS = 3

traced = tracing.part("gateway")


class Preference(Protocol):
    """Chooses a choice's worker, and hears which worker ended it."""

    def choose(self, candidates: list[WorkerHandle], index: int) -> WorkerHandle: ...

    def served(self, worker: WorkerHandle, response: worker_pb2.GenerateResponse) -> None: ...

    def reason(self, index: int) -> str:
        """Why choice ``index`` went where it last went (for its span)."""
        ...

    def predicted_tokens(self, index: int) -> int:
        """How many of choice ``index``'s prompt tokens its worker was expected to hold (for its span)."""
        ...


class _ChannelClosed(grpc.aio.AioRpcError):
    """A worker call cut short by its channel closing (the worker left the pool)."""

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "worker channel closed")


class Dispatcher:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def pick(
        self, model: str, exclude: frozenset[str] = frozenset(), prefer: Preference | None = None, index: int = 0
    ) -> WorkerHandle:
        candidates = [w for w in self.pool.workers(model) if w.worker_id not in exclude]
        if not candidates:
            self.pool.model_info(model)  # 404 for a model never served
            raise errors.no_worker(model)
        if prefer is not None:
            return prefer.choose(candidates, index)
        return least_loaded(candidates)

    @staticmethod
    def _attempt(
        model: str, handle: WorkerHandle, attempt: int, index: int = 0, prefer: Preference | None = None
    ) -> trace.Span:
        """The span of one attempt at a worker call (the call's client span): which worker, why,
        and the how-manieth. Not the current span (it lives across a stream's yields):
        :func:`_calling` makes it current while the call is made, which sends its context."""
        span = traced.start_span("dispatch", kind=trace.SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes(
                {
                    "rpc.system": "grpc",
                    "rpc.service": "tokenwire.v1.WorkerService",
                    "gen_ai.request.model": model,
                    "tokenwire.dispatch.attempt": attempt,
                    "tokenwire.dispatch.reason": "least_loaded" if prefer is None else prefer.reason(index),
                    "tokenwire.dispatch.prefix_tokens": 0 if prefer is None else prefer.predicted_tokens(index),
                    "tokenwire.worker.id": handle.worker_id,
                    "tokenwire.worker.load": handle.load(),
                    "server.address": handle.status.address,
                }
            )
            span.set_attribute("tokenwire.choice.index", index)
        return span

    @staticmethod
    @contextlib.contextmanager
    def lease(handle: WorkerHandle) -> Iterator[WorkerHandle]:
        handle.in_flight += 1
        try:
            yield handle
        finally:
            handle.in_flight -= 1

    def _failover(
        self, error: grpc.aio.AioRpcError, handle: WorkerHandle, tried: frozenset[str], attempt: int, model: str
    ) -> frozenset[str]:
        """The workers to skip on the next attempt, or raise ``error`` as ours."""
        ours = errors.ApiError.from_rpc_error(error)
        # A message over gRPC's size limit is RESOURCE_EXHAUSTED too, and no other worker takes it.
        if error.code() not in _RETRYABLE or ours.code == "request_too_large" or attempt == MAX_ATTEMPTS:
            raise ours from None
        if errors.unreachable(error):
            handle.mark_unreachable(error.details() or "UNAVAILABLE")
        tried |= {handle.worker_id}
        if not any(w.worker_id not in tried for w in self.pool.workers(model)):
            raise ours from None
        log.info("a call moves from worker %s (%s) to another", handle.worker_id, error.code().name)
        return tried

    async def unary(
        self, model: str, call: Callable[[WorkerHandle], Awaitable[T]], prefer: Preference | None = None, index: int = 0
    ) -> T:
        """One unary worker call, failed over like a choice."""
        tried: frozenset[str] = frozenset()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            handle = self.pick(model, tried, prefer, index)
            span = self._attempt(model, handle, attempt, index, prefer)
            with self.lease(handle):
                try:
                    with _calling(span):
                        return await call(handle)
                except grpc.aio.AioRpcError as error:
                    _failed(span, error)
                    tried = self._failover(error, handle, tried, attempt, model)
                except asyncio.CancelledError:
                    if really_cancelled():
                        raise
                    _failed(span, _ChannelClosed())
                    tried = self._failover(_ChannelClosed(), handle, tried, attempt, model)
                finally:
                    span.end()
        raise AssertionError("unreachable")

    async def _stream(
        self, model: str, request: worker_pb2.GenerateRequest, deadline: float | None, prefer: Preference | None
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """One streamed choice; a replacement worker's ``accepted`` is not passed on."""
        tried: frozenset[str] = frozenset()
        accepted = produced = False
        watch = current_watch.get()  # the request's token timing
        for attempt in range(1, MAX_ATTEMPTS + 1):
            handle = self.pick(model, tried, prefer, request.index)
            span = self._attempt(model, handle, attempt, request.index, prefer)
            with self.lease(handle):
                with _calling(span):
                    call = handle.stub.Generate(request, timeout=_remaining(deadline), metadata=outgoing_metadata())
                try:
                    async for response in call:
                        if response.HasField("accepted"):
                            if accepted:
                                continue
                            accepted = True
                        else:
                            produced = True
                            if watch is not None and response.delta.text:
                                watch.token()
                            if prefer is not None and response.HasField("end"):
                                prefer.served(handle, response)
                        yield response
                    return
                except grpc.aio.AioRpcError as error:
                    _failed(span, error)
                    if produced:
                        if errors.unreachable(error):
                            handle.mark_unreachable(error.details() or "UNAVAILABLE")
                        raise errors.ApiError.from_rpc_error(error) from None
                    tried = self._failover(error, handle, tried, attempt, model)
                except asyncio.CancelledError:
                    if produced or really_cancelled():
                        raise
                    _failed(span, _ChannelClosed())
                    tried = self._failover(_ChannelClosed(), handle, tried, attempt, model)
                finally:
                    call.cancel()
                    span.end()

    async def _whole(
        self, model: str, request: worker_pb2.GenerateRequest, deadline: float | None, prefer: Preference | None
    ) -> worker_pb2.GenerateResponse:
        """One non-streamed choice: accepted, all its output and its end, in one message."""

        async def call(handle: WorkerHandle) -> worker_pb2.GenerateResponse:
            reply = await handle.stub.GenerateChoice(
                worker_pb2.GenerateChoiceRequest(request=request),
                timeout=_remaining(deadline),
                metadata=outgoing_metadata(),
            )
            if prefer is not None:
                prefer.served(handle, reply.choice)
            return reply.choice

        return await self.unary(model, call, prefer, request.index)

    async def _whole_stream(
        self, model: str, request: worker_pb2.GenerateRequest, deadline: float | None, prefer: Preference | None
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        yield await self._whole(model, request, deadline, prefer)

    def choices(
        self,
        model: str,
        requests: list[worker_pb2.GenerateRequest],
        timeout: float | None,
        stream: bool,
        prefer: Preference | None = None,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """Every choice's worker messages, merged as they come; nothing before
        every choice is accepted. Non-streamed choices yield one message each.
        One choice is its worker call's own stream, with no merging around it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for request in requests:
            request.priority = current_priority.get()
        if len(requests) > 1:
            return self._fan_out(model, requests, deadline, stream, prefer)
        if stream:
            return self._stream(model, requests[0], deadline, prefer)
        return self._whole_stream(model, requests[0], deadline, prefer)

    async def _fan_out(
        self,
        model: str,
        requests: list[worker_pb2.GenerateRequest],
        deadline: float | None,
        stream: bool,
        prefer: Preference | None,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        queue: asyncio.Queue[worker_pb2.GenerateResponse | BaseException | None] = asyncio.Queue()
        choice = self._stream if stream else self._whole_stream

        async def run(request: worker_pb2.GenerateRequest) -> None:
            try:
                async for response in choice(model, request, deadline, prefer):
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
                    if item.HasField("accepted"):
                        accepted.add(item.index)
                    held.append(item)
                    if len(accepted) == len(requests):
                        for response in held:
                            yield response
                        held.clear()
                    continue
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _calling(span: trace.Span) -> contextlib.AbstractContextManager[object]:
    """``span`` current while a worker call is made: the call's metadata carries its context."""
    if not span.is_recording():
        return contextlib.nullcontext()
    return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def _failed(span: trace.Span, error: grpc.aio.AioRpcError) -> None:
    tracing.failed(span, error, error.code().name)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)
