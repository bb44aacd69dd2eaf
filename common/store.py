"""The store several front ends share (``--store``, declared in common/settings.py): its client, its health.

``--store memory`` (the default) keeps each part's state in its own process, as one front end
needs. ``--store redis://host:port/db`` (``rediss://`` for TLS) puts it in one Redis or Valkey
that every replica reaches: the gateway's per-key limits and revoked keys, the bridge's stored
Responses. Each concern has its own small interface with a memory and a Redis implementation
beside it; this module is only their plumbing.

The client is redis-py's asyncio client (with hiredis parsing replies): maintained by Redis
itself, it speaks RESP to Redis and Valkey alike, runs Lua scripts by their digest
(``EVALSHA``, loading them again after a Redis restart), and reconnects by itself on the next
command. Every command has a deadline of ``--store-timeout-ms``; a command that fails or passes
it marks the store down: the gauge ``tokenwire_store_up`` goes to 0 and one warning is logged.
While it is down, callers get :class:`StoreUnavailable` at once, without waiting on Redis, and
a probe pings it every :data:`PROBE_INTERVAL` seconds; the first answer marks it up again
(one more log line). So a hung Redis costs one request its deadline, not every request.

The password comes from ``--store-password-file`` or ``TOKENWIRE_STORE_PASSWORD``, never the
command line (ps shows it): a ``--store`` URL with a password in it is refused there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
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
T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store did not answer in time, or refused the command."""


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


class Store:
    """One part's connection to the shared store: commands with a deadline, its health followed."""

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
        self.up = True
        self._gauge = Gauge(
            "tokenwire_store_up", "1 while the shared store (--store) answers, else 0", registry=registry
        )
        self._gauge.set(1)
        self._probe: asyncio.Task[None] | None = None

    def script(self, source: str) -> Any:
        """A Lua script, run atomically on the store by its digest: ``await store.run(script(keys, args))``."""
        return self.client.register_script(source)

    async def run(self, command: Awaitable[T]) -> T:
        """``command``'s result, or :class:`StoreUnavailable` (at once while the store is down)."""
        if not self.up:
            _discard(command)
            raise StoreUnavailable("the store is down")
        try:
            return await command
        except self._errors as error:
            if isinstance(error, self._connection_errors):
                self._went_down(error)
            else:  # it answered, with an error: a misconfiguration (a full Redis, a replica), not an outage
                log.warning("store %s refused a command: %s", self.url, error)
            raise StoreUnavailable(str(error) or type(error).__name__) from error

    async def start(self) -> None:
        """Check the store once, so a wrong address is said at start (a part starts anyway, down)."""
        with contextlib.suppress(StoreUnavailable):
            await self.run(self.client.ping())
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
            except self._errors:
                continue
            self.up = True
            self._gauge.set(1)
            log.info("store %s: up again (%s)", self.url, self.part)
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.client.aclose()


def _discard(command: Awaitable[Any]) -> None:
    """A command not run: close its coroutine, so that Python does not warn it was never awaited."""
    close = getattr(command, "close", None)
    if close is not None:
        close()
