"""A worker's link to the registry: register, heartbeat, register again when
forgotten (registry restart or expiry), deregister on shutdown."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc

from common import cluster
from common.grpc_server import open_channel
from tokenwire.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from workers.slots import Slots

log = logging.getLogger("tokenwire.worker")


class RegistryLink:
    def __init__(
        self, controller_address: str, address: str, model: common_pb2.ModelInfo, slots: Slots, *, interval: float
    ) -> None:
        self.worker_id = f"{model.name}@{address}#{uuid.uuid4().hex[:8]}"
        self.address = address
        self.model = model
        self.slots = slots
        self.interval = interval
        self.channel = open_channel(controller_address)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-link")

    def _status(self) -> registry_pb2.WorkerStatus:
        return registry_pb2.WorkerStatus(
            worker_id=self.worker_id,
            address=self.address,
            model=self.model,
            capacity=self.slots.capacity,
            in_flight=self.slots.in_flight,
            queue_length=self.slots.waiting,
        )

    async def _run(self) -> None:
        registered = False
        while True:
            try:
                if not registered:
                    await self.stub.Register(
                        registry_pb2.RegisterRequest(worker=self._status()), timeout=5, metadata=cluster.call_metadata()
                    )
                    registered = True
                    log.info("registered %s", self.worker_id)
                else:
                    reply = await self.stub.Heartbeat(
                        registry_pb2.HeartbeatRequest(
                            worker_id=self.worker_id, in_flight=self.slots.in_flight, queue_length=self.slots.waiting
                        ),
                        timeout=5,
                        metadata=cluster.call_metadata(),
                    )
                    if not reply.known:
                        log.warning("the registry forgot %s; registering again", self.worker_id)
                        registered = False
                        continue
            except grpc.aio.AioRpcError as error:
                registered = False
                if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("the registry refused this worker (%s): %s", error.code().name, cluster.FIX_HINT)
                    await asyncio.sleep(self.interval)
                    continue
                log.warning("registry unreachable (%s); retrying", error.code().name)
                # Soon: the registry may just be starting (or restarting).
                await asyncio.sleep(min(self.interval, 1.0))
                continue
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self.stub.Deregister(
                registry_pb2.DeregisterRequest(worker_id=self.worker_id), timeout=2, metadata=cluster.call_metadata()
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                # Down, as when serve stops its front end (the registry in it) first: nothing to act
                # on. A registry in a gateway forgot the worker with it; a standalone one expires it.
                log.info("the registry is unreachable; it forgets %s by itself", self.worker_id)
            else:
                log.warning("could not deregister %s: %s", self.worker_id, error.code().name)
        await self.channel.close()
