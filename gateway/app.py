"""Running the gateway and the standalone registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from common import tracing
from common.grpc_server import GrpcServer
from common.observability import serve_metrics
from common.sampling import Limits
from common.store import Store, StoreConfig
from gateway import metrics
from gateway.auth import ApiKeys, AuthInterceptor, KeyLimits
from gateway.batches.redis_store import RedisBatchStore
from gateway.batches.runner import BatchLimits, BatchRunner
from gateway.batches.service import BatchServicer
from gateway.batches.storage import BatchStorage
from gateway.batches.store import BatchStore
from gateway.inference import Inference
from gateway.key_reload import KeyReloader, KeysSource, MemoryRevocations, RedisRevocations, Revocations
from gateway.pool import WorkerPool, remote_source
from gateway.rate_limits import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from gateway.registry import Registry, RegistryServicer
from gateway.routing import DEFAULT_TTL, RedisIndex, Router
from gateway.service import InferenceServicer
from tokenwire.v1 import api_pb2_grpc, batch_pb2_grpc, registry_pb2_grpc

log = logging.getLogger("tokenwire.gateway")

INFERENCE_SERVICE = "tokenwire.v1.InferenceService"
REGISTRY_SERVICE = "tokenwire.v1.RegistryService"
BATCH_SERVICE = "tokenwire.v1.BatchService"


async def run_gateway(
    *,
    host: str,
    port: int,
    controller_address: str | None,
    keys: KeysSource | None = None,
    default_limits: KeyLimits | None = None,
    store: StoreConfig | None = None,
    limits_when_store_down: str = "local",
    heartbeat_expiry: float = 15.0,
    limits: Limits | None = None,
    router: Router | None = None,
    routing_index_ttl: float = DEFAULT_TTL,
    shutdown_grace: float = 10.0,
    expect_models: list[str] | None = None,
    metrics_port: int | None = None,
    data_dir: Path | None = None,
    batch_limits: BatchLimits | None = None,
    tls: grpc.ServerCredentials | None = None,
    registry_port: int | None = None,
    registry_host: str | None = None,
    registry_tls: grpc.ServerCredentials | None = None,
    stop: asyncio.Event,
    on_ready: Callable[[int], None] | None = None,
    on_registry_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve InferenceService (and the registry, unless one is given) until ``stop``.

    With ``registry_port`` the registry gets a server of its own on that
    (internal) port, with ``registry_tls`` (mTLS, say), and the public port
    carries only the public API, health and reflection.

    Health: the process ("") is SERVING while it runs; InferenceService is
    SERVING only while each expected model (default: each model seen) has a
    live worker, which is what the bridge's /ready reports.

    With ``store`` (redis://...), the per-key limits, the revoked keys, the routing index and
    the files and batches live there, shared by every gateway that names the same store.
    """
    keys = keys or KeysSource(list, None)
    shared = Store(store, "gateway", metrics.REGISTRY) if store is not None else None
    limiter: RateLimiter = MemoryRateLimiter()
    revocations: Revocations = MemoryRevocations()
    if shared is not None:
        limiter = RedisRateLimiter(shared, limits_when_store_down)
        revocations = RedisRevocations(shared)
        if router is not None:
            router.shared = RedisIndex(shared, routing_index_ttl)
        await shared.start()  # after its scripts are made: it loads them
    api_keys = ApiKeys(keys.read(), default_limits)
    reloader = KeyReloader(api_keys, keys, revocations)
    services: list[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]] = []
    registry: Registry | None = None
    registry_server: GrpcServer | None = None
    if controller_address:
        source = remote_source(controller_address)
    else:
        registry = Registry(expiry=heartbeat_expiry)
        source = registry.watch
        registry_service = (
            registry_pb2_grpc.add_RegistryServiceServicer_to_server,
            RegistryServicer(registry),
            REGISTRY_SERVICE,
        )
        if registry_port is None:
            services.append(registry_service)
        else:
            registry_server = GrpcServer([registry_service])
    pool = WorkerPool(
        source, rejoin_grace=heartbeat_expiry, on_leave=router.worker_left if router is not None else None
    )
    inference = Inference(pool, limits, router)
    # Files and batches: in the shared store when there is one (any front end serves any batch).
    batch_store: BatchStorage = (
        RedisBatchStore(store)
        if store is not None
        else BatchStore(data_dir or Path(tempfile.mkdtemp(prefix="tokenwire-data-")))
    )
    runner = BatchRunner(batch_store, inference, api_keys, limiter, batch_limits or BatchLimits(), expect_models)
    services[:0] = [
        (api_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(inference, limiter), INFERENCE_SERVICE),
        (batch_pb2_grpc.add_BatchServiceServicer_to_server, BatchServicer(runner), BATCH_SERVICE),
    ]
    server = GrpcServer(services, interceptors=[AuthInterceptor(api_keys, limiter)], traced=tracing.part("gateway"))
    bound = server.bind(f"{host}:{port}", tls)
    registry_where = controller_address or "in-process, same port"
    if registry_server is not None:
        registry_on = registry_host or host
        registry_bound = registry_server.bind(f"{registry_on}:{registry_port}", registry_tls)
        registry_where = f"in-process, on {registry_on}:{registry_bound}"
    pool.start()
    reloading = asyncio.create_task(reloader.run())
    expiry_task = asyncio.create_task(registry.run_expiry()) if registry is not None else None
    if registry_server is not None:
        await registry_server.start()
        if on_registry_ready is not None:
            on_registry_ready(registry_on, registry_bound)
    await server.start()
    readiness = asyncio.create_task(_follow_readiness(server, pool, expect_models or []))
    running_batches = asyncio.create_task(runner.run(), name="batch-runner")
    if metrics_port is not None:
        serve_metrics(host, metrics_port, metrics.REGISTRY)
    log.info("gateway serving on %s:%d (registry: %s)", host, bound, registry_where)
    if on_ready is not None:
        on_ready(bound)
    try:
        await stop.wait()
    finally:
        log.info("gateway shutting down (grace %.0f s)", shutdown_grace)
        readiness.cancel()
        reloading.cancel()
        running_batches.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running_batches
        await server.stop(shutdown_grace)
        batch_store.close()
        if registry_server is not None:
            await registry_server.stop(1.0)
        if expiry_task is not None:
            expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry_task
        await pool.close()
        if shared is not None:
            await shared.close()


async def _follow_readiness(server: GrpcServer, pool: WorkerPool, expected: list[str]) -> None:
    while True:
        changed = pool.changed
        await server.set_status(INFERENCE_SERVICE, pool.ready(expected))
        await changed.wait()


async def run_registry(
    *,
    host: str,
    port: int,
    heartbeat_expiry: float = 15.0,
    tls: grpc.ServerCredentials | None = None,
    stop: asyncio.Event,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """A standalone registry, for several gateways sharing one set of workers."""
    registry = Registry(expiry=heartbeat_expiry)
    server = GrpcServer(
        [(registry_pb2_grpc.add_RegistryServiceServicer_to_server, RegistryServicer(registry), REGISTRY_SERVICE)]
    )
    bound = server.bind(f"{host}:{port}", tls)
    expiry_task = asyncio.create_task(registry.run_expiry())
    await server.start()
    log.info("registry serving on %s:%d", host, bound)
    if on_ready is not None:
        on_ready(bound)
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)
        expiry_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expiry_task
