"""workers/slots.py: interactive calls go first and batch calls never take the reserved slots."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from common import errors
from workers.slots import Slots


async def hold(slots: Slots, batch: bool, started: list[str], name: str, release: asyncio.Event) -> None:
    async with slots.acquire(batch):
        started.append(name)
        await release.wait()


async def test_batch_never_takes_the_reserved_slot_and_yields_a_freed_slot() -> None:
    slots = Slots(capacity=3, max_queue=8, reserved=1)
    started: list[str] = []
    release = {name: asyncio.Event() for name in ("b1", "b2", "b3", "i1", "i2")}
    tasks = [asyncio.create_task(hold(slots, True, started, n, release[n])) for n in ("b1", "b2", "b3")]
    await asyncio.sleep(0)
    assert started == ["b1", "b2"] and slots.batch_waiting == 1  # the third slot stays free
    tasks.append(asyncio.create_task(hold(slots, False, started, "i1", release["i1"])))
    await asyncio.sleep(0)
    assert started[-1] == "i1"  # at once, beside the batch
    tasks.append(asyncio.create_task(hold(slots, False, started, "i2", release["i2"])))
    await asyncio.sleep(0)
    assert "i2" not in started and slots.waiting == 2  # full: i2 and b3 wait
    release["b1"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert started[-1] == "i2"  # the freed slot goes to the interactive waiter, not b3
    release["i1"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert started[-1] == "b3"  # nobody interactive waits: batch goes on
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert slots.in_flight == 0 and slots.batch_in_flight == 0 and slots.waiting == 0


async def test_a_cancelled_waiter_leaks_no_slot_and_batch_waiters_do_not_fill_the_interactive_queue() -> None:
    slots = Slots(capacity=1, max_queue=1, reserved=1)  # batch still gets one slot
    release = asyncio.Event()
    started: list[str] = []
    running = asyncio.create_task(hold(slots, True, started, "b1", release))
    await asyncio.sleep(0)
    queued_batch = asyncio.create_task(hold(slots, True, started, "b2", release))
    await asyncio.sleep(0)
    with pytest.raises(errors.ApiError):  # the batch queue (1) is full
        async with slots.acquire(batch=True):
            pass
    queued = asyncio.create_task(hold(slots, False, started, "i1", release))
    await asyncio.sleep(0)
    assert slots.waiting == 2  # the interactive call queued despite the waiting batch call
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    release.set()
    await asyncio.gather(running, queued_batch)
    assert started == ["b1", "b2"]
    assert slots.in_flight == 0 and slots.waiting == 0


async def test_with_an_engine_that_preempts_batch_slots_do_not_hold_interactive_calls_back() -> None:
    slots = Slots(capacity=2, max_queue=8, reserved=1, preempt_batch=True)
    started: list[str] = []
    release = {name: asyncio.Event() for name in ("b1", "b2", "b3", "i1", "i2", "i3")}
    tasks = [asyncio.create_task(hold(slots, True, started, n, release[n])) for n in ("b1", "b2", "b3")]
    await asyncio.sleep(0)
    assert started == ["b1", "b2"] and slots.batch_waiting == 1  # no slot reserved: the engine preempts
    tasks += [asyncio.create_task(hold(slots, False, started, n, release[n])) for n in ("i1", "i2", "i3")]
    await asyncio.sleep(0)
    assert started == ["b1", "b2", "i1", "i2"]  # both slots again, beside the batch calls
    assert slots.waiting == 2  # i3 waits for an interactive call, b3 too
    release["b1"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert started[-1] == "i2" and slots.batch_waiting == 1  # b3 waits while i3 does
    release["i1"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert started[-1] == "i3"
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert slots.in_flight == 0 and slots.batch_in_flight == 0 and slots.waiting == 0
