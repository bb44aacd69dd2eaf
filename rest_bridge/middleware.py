"""Per-request plumbing of the bridge, as plain ASGI (no per-request objects
beyond what it needs): the request id (also on the request's span), metrics and the one log line."""

from __future__ import annotations

import logging
import time
from typing import Any

from common import observability as obs
from common import tracing
from rest_bridge import metrics

log = logging.getLogger("tokenwire.bridge")
traced = tracing.part("bridge")

_HEADER = obs.REQUEST_ID_HEADER.encode()


class RequestMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == _HEADER), None)
        rid = obs.clean_request_id(given.decode("latin-1") if given else None)
        obs.request_id.set(rid)
        tracing.set_on_current_span(traced, {tracing.REQUEST_ID: rid})  # FastAPI's HTTP span
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_HEADER, rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            metrics.HTTP_REQUESTS.labels(path, scope["method"], str(status)).inc()
            metrics.HTTP_LATENCY.labels(path).observe(elapsed)
            if path not in ("/metrics", "/health", "/ready"):
                obs.log_request(
                    log, "http", method=scope["method"], path=path, status=status, latency_ms=round(elapsed * 1000, 1)
                )
