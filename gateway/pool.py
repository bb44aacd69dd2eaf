"""The gateway's live view of the workers (dispatch over it: gateway/dispatch.py).

The view follows the registry's watch stream (in-process, or over gRPC from a
standalone registry); each worker gets one long-lived channel, opened when it
appears and closed when it goes.

The gateway also trusts what it sees itself: a worker it cannot reach (its
connection lost, which keepalive notices within interval + timeout of the worker
going silent, or refused; or a call to it failing for want of reaching it) is out
of dispatch at once, while the registry may still list it, and comes back when it
answers a health probe again. A registry that comes back after an outage (restarted, or cut off)
may list fewer workers than are alive until they register again: for a grace
(``rejoin_grace``, the gateway's --heartbeat-expiry) the pool keeps the workers
it knew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import cluster, errors
from common.grpc_server import keepalive, open_channel
from gateway import metrics
from tokenwire.v1 import common_pb2, registry_pb2, registry_pb2_grpc, worker_pb2_grpc

log = logging.getLogger("tokenwire.gateway")

WatchSource = Callable[[], AsyncIterator[list[registry_pb2.WorkerStatus]]]
FIRST_PROBE_DELAY = 0.5  # then doubling, to the keepalive interval


class WorkerHandle:
    """One live worker: its last status, its channel, and the calls we have on it."""

    def __init__(self, status: registry_pb2.WorkerStatus, on_change: Callable[[], None] = lambda: None) -> None:
        self.status = status
        self.channel = open_channel(status.address)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self.in_flight = 0  # this gateway's calls on it, running or queued there
        self._own_at_report = 0  # this gateway's calls when the last report arrived
        # Why the gateway cannot reach it now ("": it can). Out of dispatch meanwhile.
        self.unreachable = ""
        self._on_change = on_change
        self._trouble = asyncio.Event()
        self._marks = 0
        self._tasks = [
            asyncio.create_task(self._watch(), name=f"watch {status.worker_id}"),
            asyncio.create_task(self._recover(), name=f"recover {status.worker_id}"),
        ]

    @property
    def worker_id(self) -> str:
        return self.status.worker_id

    @property
    def model(self) -> common_pb2.ModelInfo:
        return self.status.model

    def report(self, status: registry_pb2.WorkerStatus) -> None:
        """The worker's status as the registry passed it on: with every worker's change, so a new
        heartbeat of this one only when its time differs."""
        if status.last_heartbeat_unix_ms != self.status.last_heartbeat_unix_ms:
            self._own_at_report = self.in_flight
        self.status = status

    def calls(self) -> int:
        """Calls at the worker, running and queued: this gateway's, exact, and other gateways' as the
        last report counts them, beyond the ones that were ours when it arrived. A report is up to a
        heartbeat interval old: read alone, it would count our calls ended since as still there."""
        reported = self.status.in_flight + self.status.queue_length
        return self.in_flight + max(0, reported - self._own_at_report)

    def load(self) -> float:
        return self.calls() / max(self.status.capacity, 1)

    def mark_unreachable(self, why: str) -> None:
        """Out of dispatch until it answers a health probe."""
        self._marks += 1
        if not self.unreachable:
            self.unreachable = why
            log.warning("worker %s is unreachable (%s); out of the pool until it answers", self.worker_id, why)
            self._on_change()
        self._trouble.set()

    async def _watch(self) -> None:
        """The channel's connection: lost (keepalive gave it up, the worker reset it) or refused, with
        calls on it or none, the worker is unreachable. The channel connects now, not at the first call."""
        state = self.channel.get_state(try_to_connect=True)
        while True:
            await self.channel.wait_for_state_change(state)
            previous, state = state, self.channel.get_state()
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                self.mark_unreachable("cannot connect")
            elif previous == grpc.ChannelConnectivity.READY and state != grpc.ChannelConnectivity.READY:
                self.mark_unreachable("connection lost")

    async def _recover(self) -> None:
        """Probe an unreachable worker until it answers SERVING, then back into dispatch."""
        while True:
            await self._trouble.wait()
            delay = FIRST_PROBE_DELAY
            while True:
                marks = self._marks
                if await self._answers() and marks == self._marks:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, keepalive().interval)
            self._trouble.clear()
            if self.unreachable:
                log.info("worker %s answers again; back in the pool", self.worker_id)
                self.unreachable = ""
                self._on_change()

    async def _answers(self) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=keepalive().timeout, metadata=cluster.call_metadata()
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self, grace: float | None = None) -> None:
        """Stop watching it, and close its channel (calls still on it get ``grace`` seconds)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.channel.close(grace)


def least_loaded(candidates: Sequence[WorkerHandle]) -> WorkerHandle:
    """The least-loaded worker (ties broken at random)."""
    best = min(w.load() for w in candidates)
    return random.choice([w for w in candidates if w.load() == best])


class WorkerPool:
    def __init__(
        self, source: WatchSource, rejoin_grace: float = 15.0, on_leave: Callable[[str], None] | None = None
    ) -> None:
        self._source = source
        self.rejoin_grace = rejoin_grace
        # Called with the address of each worker that leaves the pool (not one that is only
        # unreachable a while: it comes back with what it held, or its reports correct the index).
        self._on_leave = on_leave
        self._workers: dict[str, WorkerHandle] = {}
        # After the registry came back: keep workers it does not list until then (monotonic time).
        self._keep_until = 0.0
        self._last_snapshot: list[registry_pb2.WorkerStatus] = []
        self._kept: set[str] = set()
        # Models ever served, so that "no live worker" (503) differs from
        # "no such model" (404).
        self._known_models: dict[str, tuple[common_pb2.ModelInfo, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="worker-view")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for handle in self._workers.values():
            await handle.close()
        self._workers.clear()

    async def _follow(self) -> None:
        while True:
            first = True
            try:
                async for snapshot in self._source():
                    if first and self._workers:
                        # The registry is back (restarted, or reachable again), and may not list every live
                        # worker yet: they register again at their next heartbeat.
                        self._keep_until = time.monotonic() + self.rejoin_grace
                        asyncio.get_running_loop().call_later(self.rejoin_grace, self._reapply)
                    first = False
                    self._apply(snapshot)
            except grpc.aio.AioRpcError as error:
                # Keep serving from the current view while the registry is away.
                log.warning("registry watch failed (%s); keeping %d workers", error.code().name, len(self._workers))
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("the registry refused this gateway: %s", cluster.FIX_HINT)
            await asyncio.sleep(1.0)

    def _reapply(self) -> None:
        if time.monotonic() >= self._keep_until:
            self._apply(self._last_snapshot)

    def _apply(self, snapshot: list[registry_pb2.WorkerStatus]) -> None:
        self._last_snapshot = snapshot
        live = {status.worker_id: status for status in snapshot}
        keeping = time.monotonic() < self._keep_until
        kept = set()
        for worker_id in list(self._workers):
            if worker_id not in live:
                if keeping:
                    kept.add(worker_id)
                    continue
                handle = self._workers.pop(worker_id)
                log.info("worker %s left the pool", worker_id)
                self._left(handle)
        for worker_id, status in live.items():
            known = self._workers.get(worker_id)
            if known is None or known.status.address != status.address:
                if known is not None:
                    self._left(known)
                self._workers[worker_id] = WorkerHandle(status, self._changed)
                log.info("worker %s joined the pool (%s at %s)", worker_id, status.model.name, status.address)
            else:
                known.report(status)
            if status.model.name not in self._known_models:
                self._known_models[status.model.name] = (status.model, int(time.time()))
        if kept and kept != self._kept:
            log.info(
                "the registry is back and lists %d of %d workers; keeping the others %.0f s while they register again",
                len(self._workers) - len(kept),
                len(self._workers),
                self._keep_until - time.monotonic(),
            )
        self._kept = kept
        self._changed()

    def _left(self, handle: WorkerHandle) -> None:
        if self._on_leave is not None:
            self._on_leave(handle.status.address)
        # With a grace period: closing a channel cancels the calls still on it.
        asyncio.get_running_loop().create_task(handle.close(grace=30))

    def _changed(self) -> None:
        self._export()
        self.changed.set()
        self.changed = asyncio.Event()

    def _export(self) -> None:
        """Gauges of the workers dispatched to, as the heartbeats report them."""
        metrics.WORKER_IN_FLIGHT.clear()
        metrics.WORKER_QUEUE.clear()
        live = self.workers()
        for handle in live:
            status = handle.status
            metrics.WORKER_IN_FLIGHT.labels(status.model.name, status.address).set(status.in_flight)
            metrics.WORKER_QUEUE.labels(status.model.name, status.address).set(status.queue_length)
        for model in self._known_models:
            metrics.LIVE_WORKERS.labels(model).set(sum(1 for h in live if h.model.name == model))

    # -- queries --------------------------------------------------------------

    def workers(self, model: str = "") -> list[WorkerHandle]:
        """The workers dispatched to: listed by the registry (or kept a while), and reachable."""
        return [w for w in self._workers.values() if not w.unreachable and (not model or w.model.name == model)]

    def ready(self, expected: list[str]) -> bool:
        """A live worker for each expected model (default: each model seen)."""
        models = expected or list(self._known_models)
        return bool(models) and all(self.workers(m) for m in models)

    def known_models(self) -> dict[str, tuple[common_pb2.ModelInfo, int]]:
        """name -> (info, first seen unix time) for every model ever served."""
        return self._known_models

    def model_info(self, model: str) -> common_pb2.ModelInfo:
        known = self._known_models.get(model)
        if known is None:
            raise errors.model_not_found(model)
        return known[0]


def remote_source(address: str) -> WatchSource:
    """Watch a standalone registry over gRPC."""

    async def watch() -> AsyncIterator[list[registry_pb2.WorkerStatus]]:
        async with open_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            async for response in stub.WatchWorkers(
                registry_pb2.WatchWorkersRequest(), metadata=cluster.call_metadata()
            ):
                yield list(response.workers)

    return watch
