"""The registry (FastChat's controller): which workers are alive, and their load.

Workers register and heartbeat; a worker whose heartbeats stop for
``expiry`` seconds is dropped. Gateways watch it and keep their own view, so
the registry is never on a request's path.

A worker's address is only dialled, never trusted for identity: each worker
belongs to the cluster credential that registered it (``cluster.identity``),
and only that credential may heartbeat or deregister it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from common import cluster, errors
from tokenwire.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger("tokenwire.registry")


class Registry:
    def __init__(self, expiry: float = 15.0) -> None:
        self.expiry = expiry
        self._workers: dict[str, registry_pb2.WorkerStatus] = {}
        self._last_seen: dict[str, float] = {}
        self._owners: dict[str, str] = {}  # worker id -> the credential that registered it
        self._watchers: set[asyncio.Event] = set()

    def snapshot(self, model: str = "") -> list[registry_pb2.WorkerStatus]:
        return [w for w in self._workers.values() if not model or w.model.name == model]

    def _changed(self) -> None:
        for event in self._watchers:
            event.set()

    def _publish(self, status: registry_pb2.WorkerStatus, in_flight: int, queue_length: int) -> None:
        """A new status object for each report, never one handed out before: an in-process watcher
        (the gateway's own pool) holds the reports it was given, and tells a new one by its time."""
        published = registry_pb2.WorkerStatus()
        published.CopyFrom(status)
        published.in_flight, published.queue_length = in_flight, queue_length
        published.last_heartbeat_unix_ms = int(time.time() * 1000)
        self._workers[status.worker_id] = published
        self._last_seen[status.worker_id] = time.monotonic()
        self._changed()

    def _check_owner(self, worker_id: str, owner: str) -> None:
        if self._owners.get(worker_id, owner) != owner:
            log.warning("refused a call about worker %s from another credential", worker_id)
            raise errors.not_owner(worker_id)

    def _forget(self, worker_id: str) -> bool:
        self._last_seen.pop(worker_id, None)
        self._owners.pop(worker_id, None)
        return self._workers.pop(worker_id, None) is not None

    def register(self, status: registry_pb2.WorkerStatus, owner: str = "") -> None:
        self._check_owner(status.worker_id, owner)
        self._owners[status.worker_id] = owner
        if status.worker_id not in self._workers:
            log.info("worker %s registered (%s at %s)", status.worker_id, status.model.name, status.address)
        self._publish(status, status.in_flight, status.queue_length)

    def heartbeat(self, worker_id: str, in_flight: int, queue_length: int, owner: str = "") -> bool:
        """Record a heartbeat; False when the worker is unknown (it must register)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        self._check_owner(worker_id, owner)
        self._publish(worker, in_flight, queue_length)
        return True

    def deregister(self, worker_id: str, owner: str = "") -> None:
        self._check_owner(worker_id, owner)
        if self._forget(worker_id):
            log.info("worker %s deregistered", worker_id)
            self._changed()

    def expire(self) -> None:
        deadline = time.monotonic() - self.expiry
        for worker_id in [w for w, seen in self._last_seen.items() if seen < deadline]:
            log.warning("worker %s missed its heartbeats for %.1f s; dropped", worker_id, self.expiry)
            self._forget(worker_id)
            self._changed()

    async def run_expiry(self) -> None:
        while True:
            await asyncio.sleep(max(self.expiry / 4, 0.05))
            self.expire()

    async def watch(self) -> AsyncIterator[list[registry_pb2.WorkerStatus]]:
        """The live set now, then after every change (changes coalesce)."""
        event = asyncio.Event()
        self._watchers.add(event)
        try:
            while True:
                event.clear()
                yield self.snapshot()
                await event.wait()
        finally:
            self._watchers.discard(event)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterResponse:
        self.registry.register(request.worker, cluster.identity(context))
        return registry_pb2.RegisterResponse(expiry_seconds=self.registry.expiry)

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        known = self.registry.heartbeat(
            request.worker_id, request.in_flight, request.queue_length, cluster.identity(context)
        )
        return registry_pb2.HeartbeatResponse(known=known)

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeregisterResponse:
        self.registry.deregister(request.worker_id, cluster.identity(context))
        return registry_pb2.DeregisterResponse()

    async def ListWorkers(
        self, request: registry_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListWorkersResponse:
        return registry_pb2.ListWorkersResponse(workers=self.registry.snapshot(request.model))

    async def WatchWorkers(
        self, request: registry_pb2.WatchWorkersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        async for workers in self.registry.watch():
            yield registry_pb2.WatchWorkersResponse(workers=workers)
