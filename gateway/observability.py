"""Request ids, logs and Prometheus metrics: one place for all three processes.

A request id comes from the client (``X-Request-Id`` on REST, ``x-request-id``
metadata on gRPC) or is made at the first hop; it travels as gRPC metadata to
the gateway and the worker and is on every log line about the request.
Metric names start with ``tokenwire_`` and carry their unit; labels are
bounded (model, route, status, reason: never request ids or keys).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

import shortuuid
from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUEST_ID_HEADER = "x-request-id"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The timing of the API request being served, if any (set by the gateway's handlers).
current_watch: contextvars.ContextVar[Stopwatch | None] = contextvars.ContextVar("current_watch", default=None)


def new_request_id() -> str:
    return shortuuid.uuid()


def clean_request_id(value: str | None) -> str:
    """A client's id if it is sane (printable, short), else a new one."""
    if value and len(value) <= 128 and value.isprintable() and " " not in value:
        return value
    return new_request_id()


# -- logs -----------------------------------------------------------------------


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Our own request lines replace these.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)


def log_request(logger: logging.Logger, message: str, **fields: object) -> None:
    """One structured line per request (fields become key=value or JSON keys)."""
    logger.info(message, extra={"fields": fields})


# -- metrics ----------------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

# REST bridge
HTTP_REQUESTS = Counter(
    "tokenwire_http_requests_total", "REST requests by route and status", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "tokenwire_http_request_duration_seconds",
    "REST request latency (to the end of the body)",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)

# gateway
REQUESTS = Counter("tokenwire_requests_total", "API requests by kind, model and status", ["kind", "model", "status"])
PROMPT_TOKENS = Counter("tokenwire_prompt_tokens_total", "Prompt tokens processed", ["model"])
COMPLETION_TOKENS = Counter("tokenwire_completion_tokens_total", "Completion tokens generated", ["model"])
TTFT = Histogram(
    "tokenwire_time_to_first_token_seconds", "Time to the first generated token", ["model"], buckets=_LATENCY_BUCKETS
)
ITL = Histogram(
    "tokenwire_inter_token_latency_seconds", "Time between generated deltas", ["model"], buckets=_TOKEN_BUCKETS
)
E2E = Histogram(
    "tokenwire_request_duration_seconds", "End-to-end API request latency", ["kind", "model"], buckets=_LATENCY_BUCKETS
)
ERRORS = Counter("tokenwire_errors_total", "API errors by reason (OpenAI code)", ["model", "reason"])
CANCELLED = Counter("tokenwire_cancelled_requests_total", "Requests whose client went away", ["model"])
LIVE_WORKERS = Gauge("tokenwire_live_workers", "Live workers per model", ["model"])
WORKER_IN_FLIGHT = Gauge("tokenwire_worker_in_flight", "Calls running on a worker (heartbeat)", ["model", "worker"])
WORKER_QUEUE = Gauge("tokenwire_worker_queue_depth", "Calls queued on a worker (heartbeat)", ["model", "worker"])

# worker
ENGINE_IN_FLIGHT = Gauge("tokenwire_engine_in_flight", "Calls running on this worker", ["model"])
ENGINE_QUEUE = Gauge("tokenwire_engine_queue_depth", "Calls waiting for a slot on this worker", ["model"])
ENGINE_REQUESTS = Counter(
    "tokenwire_engine_requests_total", "Worker calls by RPC and status", ["model", "rpc", "status"]
)
ENGINE_TOKENS = Counter("tokenwire_engine_generated_tokens_total", "Tokens generated by this worker", ["model"])
ENGINE_CANCELLED = Counter(
    "tokenwire_engine_cancelled_total", "Generations stopped because their call was cancelled", ["model"]
)
ENGINE_AFTER_CANCEL = Counter(
    "tokenwire_engine_tokens_after_cancel_total",
    "Tokens generated after a cancel was seen (goal: <= 1 per cancel)",
    ["model"],
)
# continuous batching (the llama_cpp engine)
ENGINE_RUNNING = Gauge("tokenwire_engine_running_sequences", "Sequences decoding or prefilling in the batch", ["model"])
ENGINE_WAITING = Gauge(
    "tokenwire_engine_waiting_sequences", "Admitted calls waiting for a free sequence of the batch", ["model"]
)
ENGINE_STEP_TOKENS = Histogram(
    "tokenwire_engine_step_tokens",
    "Tokens carried by one decode step (one per decoding sequence plus prompt tokens)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ENGINE_STEP_SEQUENCES = Histogram(
    "tokenwire_engine_step_sequences",
    "Sequences in one decode step (the batch size)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32),
)
ENGINE_PROMPT_EVALUATED = Gauge(
    "tokenwire_engine_prompt_tokens_evaluated", "Prompt tokens run through the model since start", ["model"]
)
ENGINE_PROMPT_REUSED = Gauge(
    "tokenwire_engine_prompt_tokens_reused", "Prompt tokens whose KV was reused since start", ["model"]
)
ENGINE_KV_IN_USE = Gauge("tokenwire_engine_kv_cells_in_use", "KV cells held by running sequences", ["model"])
ENGINE_KV_CACHED = Gauge("tokenwire_engine_kv_cells_cached", "KV cells held by cached prefixes", ["model"])


def serve_metrics(host: str, port: int) -> int:
    """Expose /metrics on its own port (a thread); returns the bound port."""
    server, _ = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    print(f"METRICS {host}:{bound}", flush=True)
    return bound


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
