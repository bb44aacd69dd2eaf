"""``tokenwire status``: the live workers, their models, load and health."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import cluster
from common.grpc_server import open_sync_channel
from gateway.cluster_status import health_name, sorted_workers, worker_load
from tokenwire.v1 import common_pb2, registry_pb2, registry_pb2_grpc


def _health(address: str) -> str:
    try:
        with open_sync_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return health_name(reply.status)
    except grpc.RpcError as error:
        return error.code().name


def render(workers: list[registry_pb2.WorkerStatus], health: dict[str, str], now_ms: int) -> str:
    header = ("MODEL", "KIND", "ADDRESS", "IN FLIGHT", "QUEUE", "HEARTBEAT", "HEALTH", "WORKER")
    rows = [header]
    for w in sorted_workers(workers):
        # The same figures as GET /v1/status, plus where the worker is.
        load = worker_load(w, health.get(w.worker_id, "UNKNOWN"), now_ms)
        kind = common_pb2.ModelKind.Name(w.model.kind).removeprefix("MODEL_KIND_").lower()
        rows.append(
            (
                w.model.name,
                kind,
                w.address,
                f"{load.in_flight}/{load.capacity}",
                str(load.queue_length),
                f"{load.heartbeat_age_seconds:.1f}s ago",
                load.health,
                w.worker_id,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not workers:
        lines.append("(no live workers)")
    return "\n".join(lines)


def status(registry_address: str, model: str = "") -> str:
    with open_sync_channel(registry_address) as channel:
        reply = registry_pb2_grpc.RegistryServiceStub(channel).ListWorkers(
            registry_pb2.ListWorkersRequest(model=model), timeout=5, metadata=cluster.call_metadata()
        )
    workers = list(reply.workers)
    health = {w.worker_id: _health(w.address) for w in workers}
    return render(workers, health, int(time.time() * 1000))
