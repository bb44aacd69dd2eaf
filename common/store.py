"""The store several front ends share (``--store``, declared in common/settings.py): its client, its health.

``--store memory`` (the default) keeps each part's state in its own process, as one front end
needs. ``--store redis://host:port/db`` (``rediss://`` for TLS) puts it in one Redis or Valkey
that every replica reaches: the gateway's per-key limits and revoked keys, the bridge's stored
Responses. Each concern has its own small interface with a memory and a Redis implementation
beside it; this module is only their plumbing.

The client is redis-py's asyncio client (with hiredis parsing replies): maintained by Redis
itself, it speaks RESP to Redis and Valkey alike, and reconnects by itself on the next command.
Every command has a deadline of ``--store-timeout-ms``; a command that fails or passes it marks
the store down: the gauge ``tokenwire_store_up`` goes to 0 and one warning is logged. While it
is down, callers get :class:`StoreUnavailable` at once, without waiting on Redis, and a probe
pings it every :data:`PROBE_INTERVAL` seconds; the first answer marks it up again (one more log
line). So a hung Redis costs one request its deadline, not every request.

**Round trips.** Everything is a Lua :class:`Script` run by its digest (``EVALSHA``; once more
by its source after a Redis restart lost it), and this module owns every round trip:

- Redis learns the scripts at start and whenever it comes back after an outage.
- :meth:`Store.run` is a request's one awaited round trip. It carries, in one pipeline (no
  transaction: each script is atomic on its own), what was *deferred* for the same request
  (:meth:`Store.defer`: the gateway's admission rides with the routing lookup) and the writes
  waiting to go (so this process's counts are in before its next check).
- writes (:meth:`Store.add_writes`: a limited key's tokens, the routing index's records) are
  never awaited by a request: on the next turn of the event loop whatever is waiting goes in one
  pipeline, each concern's writes merged into one script call (a callback settles them: no task).
- one connection carries it all, pipelined across requests (:class:`_Link`).

The password comes from ``--store-password-file`` or ``TOKENWIRE_STORE_PASSWORD``, never the
command line (ps shows it): a ``--store`` URL with a password in it is refused there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import contextvars
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

MEMORY = "memory"
SCHEMES = ("redis", "rediss")
PASSWORD_ENV = "TOKENWIRE_STORE_PASSWORD"
DEFAULT_TIMEOUT_MS = 200
PROBE_INTERVAL = 0.5  # seconds between pings while the store is down
# Every key tokenwire writes starts with this: one Redis database may hold other things too.
PREFIX = "tokenwire:"

log = logging.getLogger("tokenwire.store")


class StoreUnavailable(Exception):
    """The store did not answer in time, or refused the command."""


@dataclass(frozen=True)
class Script:
    """A Lua script: ``script(keys, args)`` is one :class:`Call` of it, for :meth:`Store.run`."""

    source: str
    sha: str

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Call:
        return Call(self, tuple(keys), tuple(args))


@dataclass(frozen=True)
class Call:
    script: Script
    keys: tuple[Any, ...]
    args: tuple[Any, ...]

    def command(self, by_digest: bool = True) -> tuple[Any, ...]:
        head = ("EVALSHA", self.script.sha) if by_digest else ("EVAL", self.script.source)
        return (*head, len(self.keys), *self.keys, *self.args)


@dataclass(frozen=True)
class Write:
    """A call sent in the background; ``failed`` runs if it could not be (the store down)."""

    call: Call
    failed: Callable[[], None] | None = None


@dataclass(frozen=True)
class _Deferred:
    store: Store
    call: Call
    settle: Callable[[Any], None]  # gets the reply, or StoreUnavailable; may raise (a refusal)


# The calls deferred by the request being served, until its round trip (Store.defer).
_deferred: contextvars.ContextVar[list[_Deferred] | None] = contextvars.ContextVar("store_deferred", default=None)


async def send_deferred() -> None:
    """Send what the request being served deferred, if no round trip carried it yet: call it
    before the work the deferred calls guard (the gateway: before dispatch)."""
    pending = _deferred.get()
    if pending:
        await pending[0].store.run()


@dataclass(frozen=True)
class StoreConfig:
    url: str
    password: str | None
    timeout_ms: int


def check_flags(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """What must hold before a part starts: a URL it can use, no password on the command line."""
    url = args.store
    if url == MEMORY:
        return
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise SystemExit(f"--store must be memory, redis://host:port/db or rediss://host:port/db, not {url!r}")
    if parts.password and any(arg.split("=", 1)[0] == "--store" for arg in argv):
        raise SystemExit(
            f"--store: no password on the command line (ps shows it); use --store-password-file or {PASSWORD_ENV}"
        )


def config(args: argparse.Namespace) -> StoreConfig | None:
    """The store the flags name, or None for memory."""
    if args.store == MEMORY:
        return None
    password = os.environ.get(PASSWORD_ENV) or None
    if args.store_password_file:
        try:
            with open(args.store_password_file, encoding="utf-8") as handle:
                password = handle.read().strip()
        except OSError as error:
            raise SystemExit(f"--store-password-file {args.store_password_file}: {error.strerror}") from None
    return StoreConfig(args.store, password, args.store_timeout_ms)


def redacted(url: str) -> str:
    """The URL without a password, for logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{parts.netloc.rsplit('@', 1)[1]}").geturl()


class _Trip:
    """One round trip's commands in flight: their replies as they come, then ``replied``."""

    __slots__ = ("count", "deadline", "replied", "replies")

    def __init__(self, count: int, replied: Callable[[Any], None], deadline: float) -> None:
        self.count, self.replied, self.deadline = count, replied, deadline
        self.replies: list[Any] = []


class _Wire(asyncio.Protocol):
    """One connection's protocol: the replies it reads go to its link while it is the link's."""

    def __init__(self, link: _Link, transport: asyncio.Transport, parser: Any) -> None:
        self.link, self.transport, self.parser = link, transport, parser

    def data_received(self, data: bytes) -> None:
        if self.link._wire is self:
            self.link._received(self.parser, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link._wire is self:
            self.link._break(self.link._closed_error(f"the store closed the connection: {exc or 'EOF'}"))


class _Link:
    """One connection to the store, pipelined across callers, with no task, coroutine or timeout
    a command (as StackExchange.Redis and ioredis do): :meth:`send` queues a round trip's commands
    with the callback that gets their replies; whatever every caller queues in one turn of the
    event loop goes in one write (hiredis's ``pack_command``, in C); the replies are parsed by
    hiredis as the bytes arrive, and handed out in order. redis-py opens the connection (its TLS,
    AUTH, SELECT and client name), then this protocol takes over its transport: redis-py's own
    reads and writes cost a task and a timeout each, several times the command (bench/RESULTS.md).
    One timer follows the oldest round trip in flight: past ``--store-timeout-ms``, or when the
    connection fails, every round trip in flight fails (the callback gets the error); the next
    send reconnects."""

    def __init__(
        self, client: Any, timeout: float, refusal: type[Exception], errors: tuple[type[BaseException], ...]
    ) -> None:
        import hiredis
        import redis

        self._pool = client.connection_pool
        self._pack = hiredis.pack_command
        self._new_parser = lambda: hiredis.Reader(replyError=refusal)  # a refusal is a reply, not raised
        self._timeout = timeout
        self._closed_error, self._timeout_error = redis.ConnectionError, redis.TimeoutError
        self._connect_errors = errors  # the store's: what a failed connect raises
        self._connection: Any = None  # redis-py's, connected (kept: its writer holds our transport)
        self._wire: _Wire | None = None
        self._outbox: list[tuple[list[tuple[Any, ...]], Callable[[Any], None]]] = []
        self._in_flight: collections.deque[_Trip] = collections.deque()
        self._flush_soon = False
        self._connecting: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def send(self, commands: list[tuple[Any, ...]], replied: Callable[[Any], None]) -> None:
        """Send ``commands`` soon; ``replied`` gets their replies (a refusal as its exception
        object) or, when the link fails, the error."""
        self._outbox.append((commands, replied))
        if not self._flush_soon:  # on the next turn: this turn's round trips go with this one
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if not self._outbox:
            return
        wire = self._wire
        if wire is not None and wire.transport.is_closing():  # its replies will not come: fail them now
            self._break(self._closed_error("the connection to the store is closing"))
            wire = None
        if wire is None:
            if self._connecting is None:
                self._connecting = _background(self._connect())
            return  # sent once connected
        batch, self._outbox = self._outbox, []
        packed = b"".join(self._pack(command) for commands, _ in batch for command in commands)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        self._in_flight.extend(_Trip(len(commands), replied, deadline) for commands, replied in batch)
        wire.transport.write(packed)
        if self._deadline is None:
            self._deadline = loop.call_at(deadline, self._check_deadline)

    async def _connect(self) -> None:
        connection = self._pool.make_connection()
        try:
            await connection.connect()
            transport = connection._writer.transport  # redis-py's StreamWriter: its transport is the connection
        except self._connect_errors as error:
            self._connecting = None
            batch, self._outbox = self._outbox, []
            for _, replied in batch:
                replied(error)
            return
        self._connecting = None
        self._connection, self._wire = connection, _Wire(self, transport, self._new_parser())
        transport.set_protocol(self._wire)
        self._flush()

    def _received(self, parser: Any, data: bytes) -> None:
        in_flight = self._in_flight
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                trip = in_flight[0]
                trip.replies.append(reply)
                if len(trip.replies) == trip.count:
                    in_flight.popleft()
                    trip.replied(trip.replies)
        except Exception as error:  # a reply nobody waits for, or bytes that are not RESP
            self._break(self._closed_error(f"the store's replies cannot be read: {error!r}"))

    def _check_deadline(self) -> None:
        self._deadline = None
        if not self._in_flight:
            return
        loop = asyncio.get_running_loop()
        oldest = self._in_flight[0].deadline
        if loop.time() >= oldest - 0.001:  # (the loop's timers may fire a clock tick early)
            self._break(self._timeout_error("Timeout reading from the store"))
        else:
            self._deadline = loop.call_at(oldest, self._check_deadline)

    def _break(self, error: BaseException) -> None:
        failed, self._in_flight = self._in_flight, collections.deque()
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.transport.close()
        for trip in failed:
            trip.replied(error)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._deadline is not None:
            self._deadline.cancel()
        if self._wire is not None:
            wire, self._wire = self._wire, None
            wire.transport.close()


def _background(coroutine: Any) -> asyncio.Task[Any]:
    """A task in a context of its own: never a request's (its deferred calls are the request's to send)."""
    return asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())


class Store:
    """One part's connection to the shared store: round trips with a deadline, its health followed."""

    def __init__(self, config: StoreConfig, part: str, registry: CollectorRegistry) -> None:
        import redis.asyncio
        from prometheus_client import Gauge
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        timeout = config.timeout_ms / 1000
        self.part = part
        self.url = redacted(config.url)
        # No retries inside the client: a failed command marks the store down at once, and the
        # probe (not each request) waits for it to come back.
        self.client = redis.asyncio.Redis.from_url(
            config.url,
            password=config.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=f"tokenwire-{part}",
        )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, asyncio.TimeoutError)
        self._connection_errors: tuple[type[BaseException], ...] = (
            redis.ConnectionError,
            redis.TimeoutError,
            OSError,
            asyncio.TimeoutError,
        )
        self._refusal: type[Exception] = redis.ResponseError
        self.up = True
        self._gauge = Gauge(
            "tokenwire_store_up", "1 while the shared store (--store) answers, else 0", registry=registry
        )
        self._gauge.set(1)
        self._probe: asyncio.Task[None] | None = None
        self._writes: list[Callable[[], list[Write]]] = []
        self._scripts: list[Script] = []
        self._link = _Link(self.client, timeout, self._refusal, self._errors)
        self._write_soon = False
        self._writes_in_flight = 0  # background round trips of writes not answered yet
        self._all_written: asyncio.Future[None] | None = None

    def script(self, source: str) -> Script:
        """A Lua script, run atomically on the store: ``await store.run(script(keys, args))``."""
        script = Script(source, hashlib.sha1(source.encode()).hexdigest())
        self._scripts.append(script)
        return script

    async def _load_scripts(self) -> None:
        """Redis learns every script now, not on a request's round trip: at start, and when it is
        back (a restarted Redis has none), so that the first write after it is not two round trips
        behind another gateway's next lookup."""
        if self._scripts:
            pipeline = self.client.pipeline(transaction=False)
            for script in self._scripts:
                pipeline.script_load(script.source)
            await pipeline.execute()

    async def run(self, call: Call | None = None) -> Any:
        """``call``'s reply, or :class:`StoreUnavailable` (at once while the store is down), in one
        round trip with this request's deferred calls and the writes waiting. A deferred call's
        refusal (its ``settle`` raised) is raised here, after every call is settled."""
        pending = _deferred.get() or []
        deferred = [d for d in pending if d.store is self]
        pending[:] = [d for d in pending if d.store is not self]
        writes = self._waiting_writes()
        calls = [w.call for w in writes] + [d.call for d in deferred] + ([call] if call is not None else [])
        if not calls:
            return None
        answered: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def replied(replies: list[Any]) -> None:
            _settle_writes(writes, replies)  # whether or not the request still waits
            if not answered.done():
                answered.set_result(replies)

        self._round_trip(calls, replied)
        replies = await answered
        refusal: Exception | None = None
        for entry, reply in zip(deferred, replies[len(writes) :], strict=False):
            try:
                entry.settle(reply)
            except Exception as error:  # raised below, once every call is settled
                refusal = refusal or error
        if refusal is not None:
            raise refusal
        if call is None:
            return None
        if isinstance(replies[-1], StoreUnavailable):
            raise replies[-1]
        return replies[-1]

    def defer(self, call: Call, settle: Callable[[Any], None]) -> None:
        """Send ``call`` with the request's next round trip (:meth:`run`, at the latest
        :func:`send_deferred`), not in one of its own; ``settle`` gets its reply or StoreUnavailable."""
        pending = _deferred.get()
        if pending is None:
            pending = []
            _deferred.set(pending)
        pending.append(_Deferred(self, call, settle))

    def add_writes(self, waiting: Callable[[], list[Write]]) -> None:
        """A concern's background writes: ``waiting()`` hands over what waits (and forgets it)
        whenever the store sends; :meth:`wake` says there is some."""
        self._writes.append(waiting)

    def wake(self) -> None:
        """Writes wait: send them soon (on the next turn of the event loop, with every other
        write of this turn), in the background."""
        if not self._write_soon:
            self._write_soon = True
            asyncio.get_running_loop().call_soon(self._write)

    async def writes_sent(self) -> None:
        """Until the writes waiting now are sent (or dropped: the store down)."""
        self._write()
        if self._writes_in_flight:
            if self._all_written is None:
                self._all_written = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._all_written)

    async def ping(self) -> bool:
        if not self.up:
            raise StoreUnavailable("the store is down")
        try:
            return bool(await self.client.ping())
        except self._errors as error:
            raise self._failed(error) from error

    def _waiting_writes(self) -> list[Write]:
        return [write for waiting in self._writes for write in waiting()]

    def _write(self) -> None:
        self._write_soon = False
        writes = self._waiting_writes()
        if writes:
            self._writes_in_flight += 1
            self._round_trip([w.call for w in writes], lambda replies: self._written(writes, replies))

    def _written(self, writes: list[Write], replies: list[Any]) -> None:
        _settle_writes(writes, replies)
        self._writes_in_flight -= 1
        if not self._writes_in_flight and self._all_written is not None:
            self._all_written.set_result(None)
            self._all_written = None

    def _round_trip(self, calls: list[Call], done: Callable[[list[Any]], None]) -> None:
        """``done`` gets each call's reply, or StoreUnavailable for it: from one pipeline (two after
        a Redis restart lost the scripts: those are sent again by their source, which Redis then
        keeps), at once while the store is down."""
        if not self.up:
            done([StoreUnavailable("the store is down")] * len(calls))
            return

        def replied(replies: list[Any] | BaseException) -> None:
            if isinstance(replies, BaseException):
                done([self._failed(replies)] * len(calls))
                return
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, self._refusal) and _no_script(reply)]
            if not lost:
                finish(replies)
                return

            def resent(again: list[Any] | BaseException) -> None:
                if isinstance(again, BaseException):
                    done([self._failed(again)] * len(calls))
                    return
                for i, reply in zip(lost, again, strict=True):
                    replies[i] = reply
                finish(replies)

            self._send([calls[i].command(False) for i in lost], resent)

        def finish(replies: list[Any]) -> None:
            for i, reply in enumerate(replies):
                if isinstance(reply, self._refusal):
                    replies[i] = self._failed(reply)
            done(replies)

        self._send([c.command() for c in calls], replied)

    def _send(self, commands: list[tuple[Any, ...]], replied: Callable[[Any], None]) -> None:
        self._link.send(commands, replied)

    def _failed(self, error: BaseException) -> StoreUnavailable:
        if isinstance(error, self._connection_errors):
            self._went_down(error)
        else:  # it answered, with an error: a misconfiguration (a full Redis, a replica), not an outage
            log.warning("store %s refused a command: %s", self.url, error)
        unavailable = StoreUnavailable(str(error) or type(error).__name__)
        unavailable.__cause__ = error
        return unavailable

    async def start(self) -> None:
        """Check the store once, so a wrong address is said at start (a part starts anyway, down)."""
        with contextlib.suppress(StoreUnavailable):
            await self.ping()
            try:
                await self._load_scripts()
            except self._errors as error:
                raise self._failed(error) from error
        if self.up:
            log.info("store %s: up (%s)", self.url, self.part)

    def _went_down(self, error: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._gauge.set(0)
        log.warning(
            "store %s: down (%s): %s; retrying every %g s", self.url, self.part, error or type(error), PROBE_INTERVAL
        )
        self._probe = asyncio.get_running_loop().create_task(self._until_up())

    async def _until_up(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self.client.ping()
                await self._load_scripts()
            except self._errors:
                continue
            self.up = True
            self._gauge.set(1)
            log.info("store %s: up again (%s)", self.url, self.part)
            return

    async def close(self) -> None:
        await self.writes_sent()
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._link.close()
        await self.client.aclose()


def _no_script(refusal: BaseException) -> bool:
    """Redis does not know the script's digest (it restarted): send it by its source."""
    return str(refusal).startswith("NOSCRIPT")


def _settle_writes(writes: list[Write], replies: list[Any]) -> None:
    for write, reply in zip(writes, replies, strict=False):
        if isinstance(reply, StoreUnavailable) and write.failed is not None:
            write.failed()
