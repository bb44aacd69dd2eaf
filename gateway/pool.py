"""The gateway's live view of the workers (dispatch over it: gateway/dispatch.py).

The view follows the registry's watch stream (in-process, or over gRPC from a
standalone registry); each worker gets one long-lived channel, opened when it
appears and closed when it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from common import cluster, errors
from common.grpc_server import open_channel
from gateway import metrics
from tokenwire.v1 import common_pb2, registry_pb2, registry_pb2_grpc, worker_pb2_grpc

log = logging.getLogger("tokenwire.gateway")

WatchSource = Callable[[], AsyncIterator[list[registry_pb2.WorkerStatus]]]


class WorkerHandle:
    """One live worker: its last status, its channel, and the calls we have on it."""

    def __init__(self, status: registry_pb2.WorkerStatus) -> None:
        self.status = status
        self.channel = open_channel(status.address)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self.in_flight = 0

    @property
    def worker_id(self) -> str:
        return self.status.worker_id

    @property
    def model(self) -> common_pb2.ModelInfo:
        return self.status.model

    def load(self) -> float:
        # Our own in-flight count is exact; the heartbeat's queue length adds
        # what other gateways put there.
        return (self.in_flight + self.status.queue_length) / max(self.status.capacity, 1)


def least_loaded(candidates: Sequence[WorkerHandle]) -> WorkerHandle:
    """The least-loaded worker (ties broken at random)."""
    best = min(w.load() for w in candidates)
    return random.choice([w for w in candidates if w.load() == best])


class WorkerPool:
    def __init__(self, source: WatchSource, on_leave: Callable[[str], None] | None = None) -> None:
        self._source = source
        self._on_leave = on_leave  # called with the address of each worker that leaves
        self._workers: dict[str, WorkerHandle] = {}
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
            await handle.channel.close()
        self._workers.clear()

    async def _follow(self) -> None:
        while True:
            try:
                async for snapshot in self._source():
                    self._apply(snapshot)
            except grpc.aio.AioRpcError as error:
                # Keep serving from the current view while the registry is away.
                log.warning("registry watch failed (%s); keeping %d workers", error.code().name, len(self._workers))
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("the registry refused this gateway: %s", cluster.FIX_HINT)
            await asyncio.sleep(1.0)

    def _apply(self, snapshot: list[registry_pb2.WorkerStatus]) -> None:
        live = {status.worker_id: status for status in snapshot}
        for worker_id in list(self._workers):
            if worker_id not in live:
                handle = self._workers.pop(worker_id)
                log.info("worker %s left the pool", worker_id)
                self._left(handle)
                asyncio.get_running_loop().create_task(handle.channel.close(grace=30))
        for worker_id, status in live.items():
            known = self._workers.get(worker_id)
            if known is None or known.status.address != status.address:
                if known is not None:
                    self._left(known)
                self._workers[worker_id] = WorkerHandle(status)
                log.info("worker %s joined the pool (%s at %s)", worker_id, status.model.name, status.address)
            else:
                known.status = status
            if status.model.name not in self._known_models:
                self._known_models[status.model.name] = (status.model, int(time.time()))
        self._export(live)
        self.changed.set()
        self.changed = asyncio.Event()

    def _export(self, live: dict[str, registry_pb2.WorkerStatus]) -> None:
        """Gauges of the live set, as the heartbeats report it."""
        metrics.WORKER_IN_FLIGHT.clear()
        metrics.WORKER_QUEUE.clear()
        for status in live.values():
            metrics.WORKER_IN_FLIGHT.labels(status.model.name, status.address).set(status.in_flight)
            metrics.WORKER_QUEUE.labels(status.model.name, status.address).set(status.queue_length)
        for model in self._known_models:
            metrics.LIVE_WORKERS.labels(model).set(sum(1 for s in live.values() if s.model.name == model))

    def remove(self, worker_id: str) -> None:
        """Drop a worker we found dead; the registry will drop it too."""
        handle = self._workers.pop(worker_id, None)
        if handle is not None:
            log.warning("worker %s is unreachable; removed from the pool", worker_id)
            self._left(handle)
            metrics.LIVE_WORKERS.labels(handle.model.name).set(len(self.workers(handle.model.name)))
            # With a grace period: closing a channel cancels the calls still on
            # it, and those belong to other requests that fail over by themselves.
            asyncio.get_running_loop().create_task(handle.channel.close(grace=30))

    def _left(self, handle: WorkerHandle) -> None:
        if self._on_leave is not None:
            self._on_leave(handle.status.address)

    # -- queries --------------------------------------------------------------

    def workers(self, model: str = "") -> list[WorkerHandle]:
        return [w for w in self._workers.values() if not model or w.model.name == model]

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
