"""Request ids, logs and the /metrics endpoint, for every process.

A request id comes from the client (``X-Request-Id`` on REST, ``x-request-id``
metadata on gRPC) or is made at the first hop; it travels as gRPC metadata to
the gateway and the worker and is on every log line about the request.
Each part defines its own metrics (``gateway.metrics``, ``workers.metrics``,
``rest_bridge.metrics``) in a registry of its own, so a part exposes only its own
series, also where two parts share a process. Names start
with ``tokenwire_`` and carry their unit; labels are bounded (model, route,
status, reason: never request ids or keys).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys

import shortuuid
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

from common import addresses

REQUEST_ID_HEADER = "x-request-id"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


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

# Bucket layouts shared by the parts' histograms (each part defines its own metrics).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def part_registry() -> CollectorRegistry:
    """A part's own registry, with the process's CPU, memory and GC series.

    Not prometheus_client's global one: ``tokenwire serve`` runs the gateway and the
    bridge in one process, and each still exposes only its own series."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> int:
    """Expose ``registry`` as /metrics on its own port (a thread); returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    print(f"METRICS {addresses.join(host, bound)}", flush=True)
    return bound
