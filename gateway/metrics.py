"""The gateway's Prometheus metrics, and the timing of the API request being served."""

from __future__ import annotations

import contextvars
import time

from prometheus_client import Counter, Gauge, Histogram

from common.observability import LATENCY_BUCKETS, TOKEN_BUCKETS, part_registry

REGISTRY = part_registry()  # this part's series only, also where parts share a process

REQUESTS = Counter(
    "tokenwire_requests_total", "API requests by kind, model and status", ["kind", "model", "status"], registry=REGISTRY
)
PROMPT_TOKENS = Counter("tokenwire_prompt_tokens_total", "Prompt tokens processed", ["model"], registry=REGISTRY)
COMPLETION_TOKENS = Counter(
    "tokenwire_completion_tokens_total", "Completion tokens generated", ["model"], registry=REGISTRY
)
TTFT = Histogram(
    "tokenwire_time_to_first_token_seconds",
    "Time to the first generated token",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
ITL = Histogram(
    "tokenwire_inter_token_latency_seconds",
    "Time between generated deltas",
    ["model"],
    buckets=TOKEN_BUCKETS,
    registry=REGISTRY,
)
E2E = Histogram(
    "tokenwire_request_duration_seconds",
    "End-to-end API request latency",
    ["kind", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
ERRORS = Counter("tokenwire_errors_total", "API errors by reason (OpenAI code)", ["model", "reason"], registry=REGISTRY)
CANCELLED = Counter(
    "tokenwire_cancelled_requests_total", "Requests whose client went away", ["model"], registry=REGISTRY
)
LIVE_WORKERS = Gauge("tokenwire_live_workers", "Live workers per model", ["model"], registry=REGISTRY)
WORKER_IN_FLIGHT = Gauge(
    "tokenwire_worker_in_flight", "Calls running on a worker (heartbeat)", ["model", "worker"], registry=REGISTRY
)
WORKER_QUEUE = Gauge(
    "tokenwire_worker_queue_depth", "Calls queued on a worker (heartbeat)", ["model", "worker"], registry=REGISTRY
)

BATCH_REQUESTS = Counter(
    "tokenwire_batch_requests_total", "Batch requests with a result, by status", ["status"], registry=REGISTRY
)
BATCH_TOKENS = Counter(
    "tokenwire_batch_tokens_total", "Tokens (prompt + completion) of batch requests", registry=REGISTRY
)
BATCH_PROGRESS = Gauge(
    "tokenwire_batch_progress",
    "Requests of each running batch by state (completed, failed, pending)",
    ["batch", "state"],
    registry=REGISTRY,
)
ROUTING_DECISIONS = Counter(
    "tokenwire_routing_decisions_total",
    "Cache-aware routing decisions by reason (prefix, anchor, load) and chosen worker",
    ["model", "reason", "worker"],
    registry=REGISTRY,
)
ROUTING_PREDICTED = Counter(
    "tokenwire_routing_predicted_cached_tokens_total",
    "Cached prompt tokens the routing index predicted on the worker it chose",
    ["model"],
    registry=REGISTRY,
)
ROUTING_CACHED = Counter(
    "tokenwire_routing_reported_cached_tokens_total",
    "Cached prompt tokens those workers reported (usage.prompt_tokens_details.cached_tokens)",
    ["model"],
    registry=REGISTRY,
)
ROUTING_FORGOTTEN = Counter(
    "tokenwire_routing_forgotten_prefixes_total",
    "Index entries forgotten because their worker reported far fewer cached tokens than predicted",
    ["model"],
    registry=REGISTRY,
)
ROUTING_INDEX_ENTRIES = Gauge("tokenwire_routing_index_entries", "Prefixes in the routing index", registry=REGISTRY)
ROUTING_INDEX_BYTES = Gauge(
    "tokenwire_routing_index_bytes", "The routing index's estimated memory (its cap's measure)", registry=REGISTRY
)

_timing_children: dict[str, tuple[Histogram, Histogram]] = {}


class Stopwatch:
    """Request timing: time to first token and between deltas."""

    __slots__ = ("first", "itl", "last", "model", "start", "ttft")

    def __init__(self, model: str) -> None:
        self.model = model
        self.start = self.last = time.perf_counter()
        self.first: float | None = None
        # .labels() takes a lock and a lookup: once per model, not per token.
        children = _timing_children.get(model)
        if children is None:
            children = _timing_children[model] = (TTFT.labels(model), ITL.labels(model))
        self.ttft, self.itl = children

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.ttft.observe(now - self.start)
        else:
            self.itl.observe(now - self.last)
        self.last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# The timing of the API request being served, if any (set by the gateway's handlers).
current_watch: contextvars.ContextVar[Stopwatch | None] = contextvars.ContextVar("current_watch", default=None)
