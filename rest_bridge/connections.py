"""Connection limits of the REST bridge: a read deadline and a cap on open connections.

What uvicorn (0.54, httptools and h11 alike) enforces by itself: ``timeout_keep_alive``
bounds only the idle time of a kept-alive connection *after* a response; it is armed
when a response completes and disarmed by the first byte of the next request. Nothing
bounds a new connection, nor a request once its first byte arrived: a client that
sends half a request line holds its connection (and a file descriptor) forever.
``limit_concurrency`` is checked only when a request's head is complete (a half-open
connection never reaches it), counts open connections and running requests alike,
and answers a plain-text 503 without Retry-After.

Both limits therefore live here, in a small subclass of uvicorn's httptools protocol:
that is where the bytes arrive. An ASGI middleware would only see a request once its
head is complete, too late for a slowloris, and an asyncio-level guard would need its
own accounting beside uvicorn's. Each connection has at most one timer, re-armed
lazily (a read only notes the time), so a busy connection costs no timer churn.

- ``--request-read-timeout`` (seconds): a new connection must send a complete request
  head within this time of opening, a kept-alive one within this time of the next
  request's first byte; a body may pause no longer than this between reads. Past it
  the bridge closes the connection: silently if nothing of a request came (like an
  expired keep-alive), with a 408 if part of one did. Waits that are the bridge's own
  doing (reading paused while the app catches up, ``Expect: 100-continue``, a pipelined
  request behind a running response) do not count.
- ``--max-connections``: a connection opened while the bridge holds that many gets a
  503 with Retry-After and OpenAI's error body once its request head is in (and a small
  body drained: closing on unread bytes resets the connection and can destroy the
  answer), then is closed; it never reaches the app.
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
import time
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common import errors
from common.errors import ApiError
from rest_bridge import metrics

log = logging.getLogger("tokenwire.bridge")

# The most of a refused request's body read (and dropped) before answering.
DRAIN_LIMIT = 64 * 1024
# Descriptors kept beyond --max-connections: the gateway channel, logs, the listening socket.
SPARE_DESCRIPTORS = 256

# What a connection waits for: its first request (nothing came yet), the rest of a
# request's head, or its body. None: nothing (the app runs, or the connection is idle
# between requests, which uvicorn's keep-alive timeout covers).
OPENING, HEAD, BODY = "opening", "head", "body"


def raw_response(error: ApiError) -> bytes:
    """A complete HTTP/1.1 answer carrying an OpenAI error envelope; the connection closes after it."""
    body = orjson.dumps(error.envelope())
    lines = [
        f"HTTP/1.1 {error.http_status} {http.HTTPStatus(error.http_status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if error.retry_after:
        lines.append(f"retry-after: {error.retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read deadline and a connection cap (see the module)."""

    read_timeout: float = 5.0
    max_connections: int = 2048
    _last_refusal_log = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        metrics.HTTP_CONNECTIONS.inc()
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        self._since = 0.0
        self._drained = 0
        self._refusing = len(self.connections) > self.max_connections
        if self._refusing:
            self._log_refusal()
        self._wait(OPENING)

    def connection_lost(self, exc: Exception | None) -> None:
        metrics.HTTP_CONNECTIONS.dec()
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == BODY:
            self._since = self.loop.time()  # a body's deadline is per read
        super().data_received(data)

    def handle_websocket_upgrade(self) -> None:
        # The connection passes to uvicorn's websocket protocol (it leaves `connections` there).
        self._phase = None
        metrics.HTTP_CONNECTIONS.dec()
        super().handle_websocket_upgrade()

    # -- parser callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase == OPENING:
            self._phase = HEAD  # a first request's head counts from the connection's opening
        else:
            self._wait(HEAD)

    def on_headers_complete(self) -> None:
        if self._refusing:
            if self.expect_100_continue:
                self._refuse()  # no body comes before an answer
            else:
                self._wait(BODY)  # drained in on_body, then answered
            return
        super().on_headers_complete()
        self._wait(BODY)

    def on_body(self, body: bytes) -> None:
        if self._refusing:
            self._drained += len(body)
            if self._drained > DRAIN_LIMIT:
                self._refuse()
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = None
        if self._refusing:
            self._refuse()
            return
        super().on_message_complete()

    # -- the deadline -------------------------------------------------------------

    def _wait(self, phase: str) -> None:
        self._phase, self._since = phase, self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(self.read_timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._phase is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._excused():
            self._since = now
        left = self._since + self.read_timeout - now
        if left > 0:
            self._timer = self.loop.call_later(left, self._check)
        else:
            self._time_out()

    def _excused(self) -> bool:
        """Whether the wait is the bridge's doing, not the client's."""
        if self.flow.read_paused:  # the app has not taken what came so far, or a pipelined request waits
            return True
        cycle = self.cycle
        if cycle is None or self._refusing:
            return False
        if self._phase == BODY:
            return bool(cycle.waiting_for_100_continue)
        # A pipelined request's head while the previous response is still going out.
        return self._phase == HEAD and not cycle.response_complete

    def _time_out(self) -> None:
        phase = self._phase
        metrics.HTTP_READ_TIMEOUTS.labels(phase).inc()
        if phase == OPENING:
            self.transport.close()  # nothing was asked: nothing to answer
            return
        cycle = self.cycle if phase == BODY and not self._refusing else None
        if cycle is None or not cycle.response_started:
            error = (
                errors.too_many_connections(self.max_connections)
                if self._refusing
                else errors.request_read_timeout(self.read_timeout)
            )
            self.transport.write(raw_response(error))
            if cycle is not None:
                # The app waits for this body: it gets a disconnect, and what it sends goes nowhere.
                cycle.disconnected = True
                cycle.message_event.set()
        self.transport.close()

    # -- the cap ------------------------------------------------------------------

    def _refuse(self) -> None:
        self._phase = None
        if self.transport.is_closing():
            return
        metrics.HTTP_CONNECTIONS_REFUSED.inc()
        self.transport.write(raw_response(errors.too_many_connections(self.max_connections)))
        self.transport.close()

    def _log_refusal(self) -> None:
        now = time.monotonic()
        if now - LimitedHttpToolsProtocol._last_refusal_log > 10:
            LimitedHttpToolsProtocol._last_refusal_log = now
            log.warning("refusing connections: %d are open (--max-connections)", len(self.connections) - 1)


def protocol_class(read_timeout: float, max_connections: int) -> type[LimitedHttpToolsProtocol]:
    """The protocol uvicorn should build per connection, with these limits (``uvicorn.Config(http=...)``)."""
    limits: dict[str, Any] = {"read_timeout": read_timeout, "max_connections": max_connections}
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), limits)


def raise_descriptor_limit(max_connections: int) -> None:
    """Raise the soft limit on open files so that ``max_connections`` sockets (and some more) fit."""
    wanted = max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning(
                "--max-connections %d needs %d open files; this process may open only %d (ulimit -Hn)",
                max_connections,
                wanted,
                new,
            )
