"""The cluster's status, built one way for both of its audiences.

``GET /v1/status`` (the gateway's ``GetStatus`` RPC, behind the API keys)
shows users each model and the load and health of its live workers;
``tokenwire status`` shows operators the same rows plus the worker addresses
and ids, which stay cluster-internal and never leave through the public API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire.v1 import api_pb2, common_pb2, registry_pb2

if TYPE_CHECKING:
    from gateway.pool import WorkerPool

HEALTH_TIMEOUT = 2.0


def health_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def worker_load(worker: registry_pb2.WorkerStatus, health: str, now_ms: int) -> api_pb2.WorkerLoad:
    """One worker as a user may see it: its load and health, not where it is."""
    return api_pb2.WorkerLoad(
        capacity=worker.capacity,
        in_flight=worker.in_flight,
        queue_length=worker.queue_length,
        heartbeat_age_seconds=max(0.0, (now_ms - worker.last_heartbeat_unix_ms) / 1000),
        health=health,
    )


def sorted_workers(workers: Iterable[registry_pb2.WorkerStatus]) -> list[registry_pb2.WorkerStatus]:
    return sorted(workers, key=lambda w: (w.model.name, w.address))


def build_status(
    models: Iterable[common_pb2.ModelInfo],
    workers: Iterable[registry_pb2.WorkerStatus],
    health: Mapping[str, str],
    now_ms: int,
) -> api_pb2.GetStatusResponse:
    """Every model (also one whose workers all left), with its live workers.

    ``health`` maps worker ids to their grpc.health.v1 status name.
    """
    by_model: dict[str, api_pb2.ModelStatus] = {}
    for info in sorted(models, key=lambda m: m.name):
        by_model[info.name] = api_pb2.ModelStatus(
            model=info.name, kind=info.kind, context_length=info.context_length, engine=info.engine
        )
    for worker in sorted_workers(workers):
        entry = by_model.get(worker.model.name)
        if entry is None:
            info = worker.model
            entry = by_model[info.name] = api_pb2.ModelStatus(
                model=info.name, kind=info.kind, context_length=info.context_length, engine=info.engine
            )
        entry.workers.append(worker_load(worker, health.get(worker.worker_id, "UNKNOWN"), now_ms))
    return api_pb2.GetStatusResponse(models=[by_model[name] for name in sorted(by_model)])


async def probe_health(channel: grpc.aio.Channel) -> str:
    """A worker's grpc.health.v1 status over its channel, or the failed call's code."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return health_name(reply.status)


async def probe_all(channels: Mapping[str, grpc.aio.Channel]) -> dict[str, str]:
    """worker id -> health, probed at once."""
    names = list(channels)
    results = await asyncio.gather(*(probe_health(channels[name]) for name in names))
    return dict(zip(names, results, strict=True))


async def pool_status(pool: WorkerPool) -> api_pb2.GetStatusResponse:
    """The gateway's own live view, its workers' health probed now."""
    handles = pool.workers()
    health = await probe_all({h.worker_id: h.channel for h in handles})
    models = [info for info, _ in pool.known_models().values()]
    return build_status(models, [h.status for h in handles], health, int(time.time() * 1000))
