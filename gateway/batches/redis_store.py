"""Files and batches in the replicas' shared store (``--store redis://...``): any front end serves any batch.

The same semantics as :class:`gateway.batches.store.BatchStore` (SQLite), in Redis keys under
``tokenwire:batch:``:

- ``file:{id}`` a hash, the file's row; ``file:{id}:data`` its bytes, written in pieces under a
  temporary key and renamed into place with the row (a row always has its bytes), read back in
  pieces (GETRANGE) so that no reply is one huge string;
- ``files:{owner}`` and ``files:{owner}:{purpose}``, ``batches:{owner}``: ids by ``seq`` (one
  counter), listed newest first; ``active``: the batches the runner has work on, oldest first;
- ``batch:{id}`` a hash, the batch's row; ``batch:{id}:bodies`` custom_id -> body;
  ``batch:{id}:pending``, ``:completed``, ``:failed`` custom_ids by line; ``batch:{id}:results``
  custom_id -> its result line. A result is committed by one script that moves the custom_id
  out of ``pending``: once, whatever runs the request again;
- ``runner``: the lease of the gateway that runs the batches (SET NX PX, renewed at each pass of
  the runner; a dead gateway's lease runs out and another takes over where the results stop).

The client is redis-py's blocking one, as SQLite's calls block: the runner and the servicer call
the store synchronously, and one command on a reachable Redis takes well under a millisecond.
Each command has the store's deadline (``--store-timeout-ms``); one that fails or passes it is
503 ``store_unavailable`` to the API and a pause to the runner. Then every call fails at once,
without touching Redis, while a thread pings it every :data:`PROBE_INTERVAL` seconds; its first
answer marks it up again. So a hung Redis blocks the gateway's loop for one deadline, not one
per call.

Durability is Redis's: with ``appendonly yes`` and ``appendfsync everysec`` a crash of Redis
loses at most about the last second of writes. A result lost that way is pending again and is
run again; the output still has each custom_id once. Without the append-only file a restart of
Redis loses everything: one warning at start says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import redis
import shortuuid
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import errors
from common.store import PREFIX, PROBE_INTERVAL, StoreConfig, redacted
from gateway.batches.storage import ACTIVE, TIMESTAMPS, Request, not_found

log = logging.getLogger("tokenwire.gateway.batch")

KEYS = f"{PREFIX}batch:"
# How long the runner's lease lasts unrenewed: a dead gateway's batches move to another after it.
LEASE_MS = 5000
# Bytes per GETRANGE/APPEND, and custom_ids per reply when results are read.
PIECE = 1024 * 1024
PAGE = 1000
# A file's bytes are written under a temporary key first; one left by a crash mid-write goes away.
PARTIAL_TTL_MS = 3600 * 1000
UNAVAILABLE = "Files and batches cannot be reached: the shared store is unavailable."

FILE_COLUMNS = ("id", "owner", "filename", "purpose", "bytes", "created_at", "seq")
BATCH_COLUMNS = (
    "id",
    "owner",
    "endpoint",
    "input_file_id",
    "completion_window",
    "status",
    "created_at",
    "expires_at",
    "output_file_id",
    "error_file_id",
    "errors",
    "metadata",
    "total",
    "seq",
    *TIMESTAMPS,
)
INTEGERS = frozenset(("bytes", "created_at", "expires_at", "total", "seq", *TIMESTAMPS))

# KEYS: pending, the state's set, results. ARGV: custom_id, result. Only while pending.
COMMIT = """
local line = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not line then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], line, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""
# KEYS: the lease. ARGV: this gateway, milliseconds. Renewed if ours, taken if free.
CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


def _row(raw: dict[bytes, bytes], columns: tuple[str, ...]) -> dict[str, Any] | None:
    if not raw:
        return None
    row: dict[str, Any] = dict.fromkeys(columns)
    for name, value in raw.items():
        column = name.decode()
        row[column] = int(value) if column in INTEGERS else value.decode()
    return row


class RedisBatchStore:
    def __init__(self, config: StoreConfig) -> None:
        timeout = config.timeout_ms / 1000
        self.url = redacted(config.url)
        # One retry, on a broken connection only (a restarted Redis closed it): a refused or timed
        # out command is said at once (503), and the next call after PROBE_INTERVAL tries again.
        # Any: redis-py's types cover its replies' every shape (bytes | str | ...); ours are bytes.
        self.client: Any = redis.Redis.from_url(
            config.url,
            password=config.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            client_name="tokenwire-batches",
        )
        self._commit = self.client.register_script(COMMIT)
        self._claim = self.client.register_script(CLAIM)
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{shortuuid.uuid()[:8]}"
        self._claimed = False
        self._up = True
        self._probe: threading.Thread | None = None
        self._closed = threading.Event()
        self._check_durability()

    def close(self) -> None:
        self._closed.set()
        if self._claimed:  # let another gateway take over now, not a lease later
            with contextlib.suppress(redis.RedisError, OSError):
                self.client.eval(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
                    1,
                    f"{KEYS}runner",
                    self.runner_id,
                )
        self.client.close()

    def _check_durability(self) -> None:
        """One warning if Redis keeps nothing across its restart (a managed Redis may refuse CONFIG)."""
        try:
            reply = self.client.config_get("appendonly")
        except (redis.RedisError, OSError):
            return
        value = next(iter(reply.values()), b"") if reply else b""
        if value in (b"no", "no"):
            log.warning(
                "store %s: appendonly is off: a restart of Redis loses every file and batch (set appendonly yes)",
                self.url,
            )

    @contextlib.contextmanager
    def _answering(self) -> Iterator[None]:
        """Redis's failures as 503 store_unavailable (at once while it is down)."""
        if not self._up:
            raise errors.store_unavailable(UNAVAILABLE)
        try:
            yield
        except (redis.RedisError, OSError) as error:
            if isinstance(error, redis.ResponseError):  # it answered: a misconfiguration, not an outage
                log.warning("store %s refused a batch command: %s", self.url, error)
            else:
                self._went_down(error)
            raise errors.store_unavailable(UNAVAILABLE) from error

    def _went_down(self, error: BaseException) -> None:
        if not self._up:
            return
        self._up = False
        log.warning("store %s: down for batches: %s; retrying every %g s", self.url, error, PROBE_INTERVAL)
        self._probe = threading.Thread(target=self._until_up, name="batch-store-probe", daemon=True)
        self._probe.start()

    def _until_up(self) -> None:
        """Ping, off the event loop, until Redis answers."""
        while not self._closed.wait(PROBE_INTERVAL):
            try:
                self.client.ping()
            except (redis.RedisError, OSError):
                continue
            self._up = True
            log.info("store %s: up again for batches", self.url)
            return

    def claim(self) -> bool:
        """Whether this gateway holds the runner's lease (renewed here, at each pass of the runner)."""
        with self._answering():
            held = bool(self._claim(keys=[f"{KEYS}runner"], args=[self.runner_id, LEASE_MS]))
        if held != self._claimed:
            log.info("batches: %s the runner's lease (%s)", "took" if held else "lost", self.runner_id)
        self._claimed = held
        return held

    def _next_seq(self) -> int:
        return int(self.client.incr(f"{KEYS}seq"))

    def _rows(self, ids: list[bytes], kind: str, columns: tuple[str, ...]) -> list[dict[str, Any]]:
        pipeline = self.client.pipeline(transaction=False)
        for object_id in ids:
            pipeline.hgetall(f"{KEYS}{kind}:{object_id.decode()}")
        return [row for raw in pipeline.execute() if (row := _row(raw, columns)) is not None]

    def _page(self, key: str, limit: int, after_seq: int | None) -> tuple[list[bytes], bool]:
        if after_seq is None:
            ids = self.client.zrevrange(key, 0, limit)
        else:
            ids = self.client.zrevrangebyscore(key, f"({after_seq}", "-inf", start=0, num=limit + 1)
        return ids[:limit], len(ids) > limit

    # -- files ----------------------------------------------------------------

    def add_file(
        self, owner: str, filename: str, purpose: str, content: bytes, file_id: str | None = None
    ) -> dict[str, Any]:
        """A new file; with ``file_id``, written again whole if it exists (a batch's results)."""
        file_id = file_id or f"file-{shortuuid.uuid()}"
        partial = f"{KEYS}file:{file_id}:data:{shortuuid.uuid()}"
        with self._answering():
            self.client.set(partial, content[:PIECE], px=PARTIAL_TTL_MS)
            for start in range(PIECE, len(content), PIECE):
                self.client.append(partial, content[start : start + PIECE])
            row = {
                "id": file_id,
                "owner": owner,
                "filename": filename,
                "purpose": purpose,
                "bytes": len(content),
                "created_at": int(time.time()),
                "seq": self._next_seq(),
            }
            pipeline = self.client.pipeline(transaction=True)
            pipeline.rename(partial, f"{KEYS}file:{file_id}:data")
            pipeline.persist(f"{KEYS}file:{file_id}:data")
            pipeline.hset(f"{KEYS}file:{file_id}", mapping=row)
            for listing in (f"{KEYS}files:{owner}", f"{KEYS}files:{owner}:{purpose}"):
                pipeline.zadd(listing, {file_id: row["seq"]})
            pipeline.execute()
        return row

    def file(self, owner: str, file_id: str) -> dict[str, Any]:
        with self._answering():
            row = _row(self.client.hgetall(f"{KEYS}file:{file_id}"), FILE_COLUMNS)
        if row is None or row["owner"] != owner:
            raise not_found("File", file_id)
        return row

    def files(self, owner: str, purpose: str, limit: int, after: str) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, a page after the file ``after``."""
        after_seq = self.file(owner, after)["seq"] if after else None
        key = f"{KEYS}files:{owner}:{purpose}" if purpose else f"{KEYS}files:{owner}"
        with self._answering():
            ids, more = self._page(key, limit, after_seq)
            return self._rows(ids, "file", FILE_COLUMNS), more

    def content(self, owner: str, file_id: str) -> bytes:
        with self.open_content(owner, file_id) as content:
            return b"".join(iter(lambda: content.read(PIECE), b""))

    def open_content(self, owner: str, file_id: str) -> BinaryIO:
        """The file to read in pieces, each one GETRANGE (a file deleted meanwhile ends early)."""
        row = self.file(owner, file_id)
        return io.BufferedReader(_Content(self, f"{KEYS}file:{file_id}:data", row["bytes"]), PIECE)

    def delete_file(self, owner: str, file_id: str) -> None:
        row = self.file(owner, file_id)
        with self._answering():
            pipeline = self.client.pipeline(transaction=True)
            pipeline.delete(f"{KEYS}file:{file_id}", f"{KEYS}file:{file_id}:data")
            pipeline.zrem(f"{KEYS}files:{owner}", file_id)
            pipeline.zrem(f"{KEYS}files:{owner}:{row['purpose']}", file_id)
            pipeline.execute()

    # -- batches --------------------------------------------------------------

    def add_batch(
        self, owner: str, endpoint: str, input_file_id: str, window_seconds: int, metadata: dict[str, str]
    ) -> dict[str, Any]:
        batch_id = f"batch_{shortuuid.uuid()}"
        now = int(time.time())
        with self._answering():
            row = {
                "id": batch_id,
                "owner": owner,
                "endpoint": endpoint,
                "input_file_id": input_file_id,
                "completion_window": "24h",
                "status": "validating",
                "created_at": now,
                "expires_at": now + window_seconds,
                "metadata": json.dumps(metadata),
                "total": 0,
                "seq": self._next_seq(),
            }
            pipeline = self.client.pipeline(transaction=True)
            pipeline.hset(f"{KEYS}batch:{batch_id}", mapping=row)
            pipeline.zadd(f"{KEYS}batches:{owner}", {batch_id: row["seq"]})
            pipeline.zadd(f"{KEYS}active", {batch_id: row["seq"]})
            pipeline.execute()
        return self.batch(owner, batch_id)

    def batch(self, owner: str | None, batch_id: str) -> dict[str, Any]:
        """A batch of ``owner`` (None: whoever's, for the runner)."""
        with self._answering():
            row = _row(self.client.hgetall(f"{KEYS}batch:{batch_id}"), BATCH_COLUMNS)
        if row is None or (owner is not None and row["owner"] != owner):
            raise not_found("Batch", batch_id)
        return row

    def batches(self, owner: str, limit: int, after: str) -> tuple[list[dict[str, Any]], bool]:
        after_seq = self.batch(owner, after)["seq"] if after else None
        with self._answering():
            ids, more = self._page(f"{KEYS}batches:{owner}", limit, after_seq)
            return self._rows(ids, "batch", BATCH_COLUMNS), more

    def active(self) -> list[dict[str, Any]]:
        """Batches the runner has work on, oldest first."""
        with self._answering():
            return self._rows(self.client.zrange(f"{KEYS}active", 0, -1), "batch", BATCH_COLUMNS)

    def set_status(self, batch_id: str, status: str, **fields: Any) -> None:
        """A new status, with its timestamp (``<status>_at``) and other columns (None: unset)."""
        stamp = f"{status}_at"
        if stamp in TIMESTAMPS:
            fields[stamp] = int(time.time())
        values = {"status": status, **{name: value for name, value in fields.items() if value is not None}}
        unset = [name for name, value in fields.items() if value is None]
        with self._answering():
            pipeline = self.client.pipeline(transaction=True)
            pipeline.hset(f"{KEYS}batch:{batch_id}", mapping=values)
            if unset:
                pipeline.hdel(f"{KEYS}batch:{batch_id}", *unset)
            if status not in ACTIVE:
                pipeline.zrem(f"{KEYS}active", batch_id)
            pipeline.execute()

    def start(self, batch_id: str, requests: list[tuple[int, str, str]]) -> None:
        """Validated: its requests (line, custom_id, body JSON), in one transaction with in_progress."""
        key = f"{KEYS}batch:{batch_id}"
        with self._answering():
            pipeline = self.client.pipeline(transaction=True)
            for start in range(0, len(requests), PAGE):
                page = requests[start : start + PAGE]
                pipeline.hset(f"{key}:bodies", mapping={custom_id: body for _, custom_id, body in page})
                pipeline.zadd(f"{key}:pending", {custom_id: line for line, custom_id, _ in page})
            values = {"status": "in_progress", "in_progress_at": int(time.time()), "total": len(requests)}
            pipeline.hset(key, mapping=values)
            pipeline.execute()

    def fail(self, batch_id: str, problems: list[dict[str, Any]]) -> None:
        self.set_status(batch_id, "failed", errors=json.dumps(problems))

    def pending(self, batch_id: str, limit: int, skip: set[str]) -> list[Request]:
        """Requests without a result, in file order, but those in ``skip`` (running now)."""
        key = f"{KEYS}batch:{batch_id}"
        with self._answering():
            found = self.client.zrange(f"{key}:pending", 0, limit + len(skip) - 1, withscores=True)
            wanted = [(custom_id.decode(), int(line)) for custom_id, line in found if custom_id.decode() not in skip]
            wanted = wanted[:limit]
            bodies = self.client.hmget(f"{key}:bodies", [custom_id for custom_id, _ in wanted]) if wanted else []
        return [
            Request(batch_id, line, custom_id, json.loads(body))
            for (custom_id, line), body in zip(wanted, bodies, strict=True)
            if body is not None
        ]

    def commit(self, request: Request, ok: bool, result: str) -> bool:
        """Its one result (a JSON line): False when it already had one (nothing is written twice)."""
        key = f"{KEYS}batch:{request.batch_id}"
        state = "completed" if ok else "failed"
        with self._answering():
            keys = [f"{key}:pending", f"{key}:{state}", f"{key}:results"]
            return bool(self._commit(keys=keys, args=[request.custom_id, result]))

    def counts(self, batch_id: str) -> dict[str, int]:
        key = f"{KEYS}batch:{batch_id}"
        with self._answering():
            pipeline = self.client.pipeline(transaction=False)
            for state in ("completed", "failed", "pending"):
                pipeline.zcard(f"{key}:{state}")
            completed, failed, pending = pipeline.execute()
        return {"completed": completed, "failed": failed, "pending": pending}

    def results(self, batch_id: str, state: str) -> list[str]:
        """The committed result lines of one state, in input order (a page of them per reply)."""
        key = f"{KEYS}batch:{batch_id}"
        lines: list[str] = []
        with self._answering():
            start = 0
            while ids := self.client.zrange(f"{key}:{state}", start, start + PAGE - 1):
                lines += [line.decode() for line in self.client.hmget(f"{key}:results", ids) if line is not None]
                start += PAGE
        return lines


class _Content(io.RawIOBase):
    """A file's bytes in Redis, read a piece (one GETRANGE) at a time."""

    def __init__(self, store: RedisBatchStore, key: str, size: int) -> None:
        self._store, self._key, self._size, self._at = store, key, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._size - self._at)
        if wanted <= 0:
            return 0
        with self._store._answering():
            piece = self._store.client.getrange(self._key, self._at, self._at + wanted - 1)
        buffer[: len(piece)] = piece
        self._at += len(piece)
        return len(piece)
