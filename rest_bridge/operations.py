"""For operators and probes: ``/health``, ``/ready``, ``/metrics`` and ``GET /v1/status``."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import Response
from grpc_health.v1 import health_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rest_bridge import exchange, openapi, status
from rest_bridge import metrics as bridge_metrics
from tokenwire.v1 import api_pb2

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> Response:
    """Alive: the bridge answers."""
    return exchange.json_response({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    """Ready: the gateway serves, with a live worker for each of its models."""
    try:
        reply = await request.app.state.health.Check(
            health_pb2.HealthCheckRequest(service="tokenwire.v1.InferenceService"), timeout=2
        )
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        serving = False
    return exchange.json_response({"status": "ready" if serving else "not ready"}, 200 if serving else 503)


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(bridge_metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/status", responses=openapi.ERROR_RESPONSES)
async def cluster_status(request: Request) -> Response:
    """Each model and its live workers' load and health (no worker addresses or ids)."""
    reply = await exchange.gateway_stub(request).GetStatus(
        api_pb2.GetStatusRequest(), metadata=exchange.call_metadata(request), timeout=10
    )
    return exchange.json_response(status.status(reply))
