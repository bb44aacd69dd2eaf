"""Admission control for one worker: a bounded number of running calls and a
bounded queue in front of them. A full queue refuses at once (429), it never
grows without bound; every slot is released in ``finally``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from common import errors


class Slots:
    def __init__(self, capacity: int, max_queue: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.max_queue = max_queue
        self.in_flight = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(capacity)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        if self.in_flight >= self.capacity and self.waiting >= self.max_queue:
            raise errors.rate_limited("The model worker is at capacity and its queue is full. Retry shortly.")
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._semaphore.release()
