"""``GET /v1/status``: the gateway's GetStatus reply as JSON for people and the chat page."""

from __future__ import annotations

from typing import Any

from tokenwire.v1 import api_pb2, common_pb2


def _worker(w: api_pb2.WorkerLoad) -> dict[str, Any]:
    return {
        "capacity": w.capacity,
        "in_flight": w.in_flight,
        "queue_length": w.queue_length,
        "heartbeat_age_seconds": round(w.heartbeat_age_seconds, 3),
        "health": w.health,
    }


def status(reply: api_pb2.GetStatusResponse) -> dict[str, Any]:
    """Models with their live workers and the totals of their load; no addresses or ids."""
    models = []
    for m in reply.models:
        models.append(
            {
                "id": m.model,
                "kind": common_pb2.ModelKind.Name(m.kind).removeprefix("MODEL_KIND_").lower(),
                "context_length": m.context_length,
                "engine": m.engine,
                "live_workers": len(m.workers),
                "in_flight": sum(w.in_flight for w in m.workers),
                "queue_length": sum(w.queue_length for w in m.workers),
                "workers": [_worker(w) for w in m.workers],
            }
        )
    return {"object": "status", "models": models}
