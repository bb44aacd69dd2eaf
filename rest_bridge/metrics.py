"""The REST bridge's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from common.observability import LATENCY_BUCKETS, part_registry

REGISTRY = part_registry()  # this part's series only, also where parts share a process

HTTP_REQUESTS = Counter(
    "tokenwire_http_requests_total",
    "REST requests by route and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "tokenwire_http_request_duration_seconds",
    "REST request latency (to the end of the body)",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
HTTP_CONNECTIONS = Gauge("tokenwire_http_connections", "HTTP connections open on this bridge", registry=REGISTRY)
HTTP_CONNECTIONS_REFUSED = Counter(
    "tokenwire_http_connections_refused_total",
    "HTTP connections refused past --max-connections (503)",
    registry=REGISTRY,
)
HTTP_READ_TIMEOUTS = Counter(
    "tokenwire_http_read_timeouts_total",
    "HTTP connections closed because a request did not arrive in time (--request-read-timeout)",
    ["phase"],
    registry=REGISTRY,
)
