"""The REST bridge's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from common.observability import LATENCY_BUCKETS

HTTP_REQUESTS = Counter(
    "tokenwire_http_requests_total", "REST requests by route and status", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "tokenwire_http_request_duration_seconds",
    "REST request latency (to the end of the body)",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
