"""Admission control for one worker: a bounded number of running calls and a
bounded queue in front of them. A full queue refuses at once (429), it never
grows without bound; every slot is released in ``finally``.

Two tiers share the slots. Interactive calls are admitted first: a freed slot
goes to a waiting interactive call before any batch call. Batch calls (the
gateway's batch runner) never hold more than ``capacity - reserved`` slots, so
an interactive request finds a slot at once beside a batch. With an engine that
preempts batch work (llama.cpp's ``--batch-yield preempt``), no slot is reserved and
slots batch calls hold do not count against interactive ones at all: the engine
ends a batch sequence when an interactive one needs its place, and the runner
retries it later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from common import errors


class Slots:
    def __init__(self, capacity: int, max_queue: int, reserved: int = 1, preempt_batch: bool = False) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.max_queue = max_queue
        # At least one slot for batch work, whatever the reserve; none kept when the engine
        # preempts batch work (an interactive call gets in anyway).
        self.batch_limit = capacity if preempt_batch else max(capacity - reserved, 1)
        self.preempt_batch = preempt_batch
        self.in_flight = 0
        self.batch_in_flight = 0
        self._interactive: deque[asyncio.Future[None]] = deque()
        self._batch: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self._interactive) + self.batch_waiting

    @property
    def batch_waiting(self) -> int:
        return sum(not f.done() for f in self._batch)

    def _interactive_waiting(self) -> bool:
        return any(not f.done() for f in self._interactive)

    def _may_start(self, batch: bool) -> bool:
        if not batch and self.preempt_batch:
            return self.in_flight - self.batch_in_flight < self.capacity
        if self.in_flight >= self.capacity:
            return False
        return not batch or (self.batch_in_flight < self.batch_limit and not self._interactive_waiting())

    def _take(self, batch: bool) -> None:
        self.in_flight += 1
        self.batch_in_flight += batch

    def _release(self, batch: bool) -> None:
        self.in_flight -= 1
        self.batch_in_flight -= batch
        self._hand_over()

    def _hand_over(self) -> None:
        """Give free slots to waiters: interactive ones first, then batch ones within their limit."""
        for batch, queue in ((False, self._interactive), (True, self._batch)):
            while queue and self._may_start(batch):
                waiter = queue.popleft()
                if not waiter.done():  # a cancelled waiter is skipped
                    self._take(batch)
                    waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def acquire(self, batch: bool = False) -> AsyncIterator[None]:
        queue = self._batch if batch else self._interactive
        if self._may_start(batch) and not any(not f.done() for f in queue):
            self._take(batch)
        else:
            # Batch waiters do not count against an interactive call's queue room.
            waiting = self.batch_waiting if batch else self.waiting - self.batch_waiting
            if waiting >= self.max_queue:
                raise errors.rate_limited("The model worker is at capacity and its queue is full. Retry shortly.")
            waiter = asyncio.get_running_loop().create_future()
            queue.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed a slot as we were cancelled
                    self._release(batch)
                raise
        try:
            yield
        finally:
            self._release(batch)
