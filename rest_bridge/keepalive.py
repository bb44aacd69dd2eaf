"""SSE keep-alives: a stream that has sent nothing for a while sends the comment ``: keep-alive``.

Proxies and load balancers with idle timeouts (often 60 s) cut a silent stream: one
waiting in a worker's queue, or in a long prompt evaluation, before its first token.
A line starting with ``:`` is an SSE comment, which every SSE parser skips (the OpenAI
SDK's included), so it keeps the connection busy without changing the stream.

The bridge takes a stream's HTTP status from its first gRPC message (the worker's
"accepted": prompt rendered, context length checked), so a 400 or 429 keeps its real
status. It waits for that message up to one keep-alive interval. A stream still waiting
then (queued behind other work) is committed: 200, a keep-alive at once and then one
per silent interval; an error that comes later goes out in-band, as any error after
the first message does (``data: {"error": ...}``, or ``error`` / ``response.failed``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any, TypeVar

import grpc
from starlette.responses import StreamingResponse
from starlette.types import Send

from common.errors import ApiError

T = TypeVar("T")

KEEPALIVE = b": keep-alive\n\n"


async def _next(iterator: AsyncIterator[T]) -> T | None:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Read its error, so that a stream cancelled before anyone awaited it logs nothing.
    if not future.cancelled():
        future.exception()


async def first_message(iterator: AsyncIterator[T], interval: float) -> asyncio.Future[T | None]:
    """The stream's first message (None: the stream ended at once) as a future.

    Returned once it is done, or after ``interval`` seconds still pending (the
    caller then commits the status and awaits it in the body); ``interval`` 0
    waits as long as it takes. A first message that failed in time is raised as
    its OpenAI error, so it answers with its own HTTP status.
    """
    future = asyncio.ensure_future(_next(iterator))
    future.add_done_callback(_retrieve)
    try:
        await asyncio.wait((future,), timeout=interval if interval > 0 else None)
    except BaseException:
        future.cancel()
        raise
    if future.done():
        try:
            future.result()
        except grpc.aio.AioRpcError as error:
            raise ApiError.from_rpc_error(error) from None
    return future


class KeepAliveResponse(StreamingResponse):
    """An SSE response that sends ``KEEPALIVE`` whenever it sent nothing for ``interval`` seconds.

    A timer task beside the body: a chunk costs an uncontended lock and a clock read,
    and the task wakes once per interval. The lock keeps a keep-alive from landing
    inside another send.
    """

    def __init__(self, content: AsyncIterable[bytes], interval: float, headers: Mapping[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.interval = interval

    async def stream_response(self, send: Send) -> None:
        if self.interval <= 0:
            await super().stream_response(send)
            return
        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = loop.time()

        async def beat() -> None:
            nonlocal last
            while True:
                await asyncio.sleep(last + self.interval - loop.time())
                if loop.time() - last >= self.interval:
                    async with lock:
                        await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                    last = loop.time()

        async def beat_quietly() -> None:
            with contextlib.suppress(OSError):  # the client left: the body's own send notices
                await beat()

        beater = asyncio.create_task(beat_quietly())
        try:
            async for chunk in self.body_iterator:
                async with lock:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last = loop.time()
        finally:
            beater.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
