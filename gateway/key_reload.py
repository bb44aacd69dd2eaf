"""Keys that change without a restart: the keys file read again, revocations shared by replicas.

The gateway reads ``--api-keys-file`` again when it changes (checked every
:data:`POLL_INTERVAL` seconds) or on SIGHUP. A key the new file lacks is revoked: refused
here at once, and published to the shared store's list of revoked keys, which every replica
reads every :data:`POLL_INTERVAL` seconds, so a key dropped from one replica's file stops
working on all of them within two intervals, whatever their own files say. A key that comes
back into a file leaves the list. A file that cannot be read or parsed keeps the keys as they
were (and says so in the log). ``--api-keys`` (a flag, or its environment variable) is read
once: only the file changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from common.store import PREFIX, Store, StoreUnavailable
from gateway.auth import ApiKeys, KeySpec

POLL_INTERVAL = 1.0

log = logging.getLogger("tokenwire.gateway")


@dataclass(frozen=True)
class KeysSource:
    """Where the keys come from: ``read`` gives them all (flag and file), ``path`` is the file to watch."""

    read: Callable[[], list[KeySpec]]
    path: str | None


class Revocations(Protocol):
    """The revoked keys (their ids) every replica refuses."""

    async def publish(self, revoked: set[str], restored: set[str]) -> None:
        """Add ``revoked`` to the list and take ``restored`` out of it (StoreUnavailable: not done)."""

    async def fetch(self) -> frozenset[str] | None:
        """The list, or None when it has not changed since the last fetch."""


class MemoryRevocations:
    """One front end: the keys file is the whole truth; the list only remembers what it dropped."""

    def __init__(self) -> None:
        self._revoked: set[str] = set()
        self._changed = False

    async def publish(self, revoked: set[str], restored: set[str]) -> None:
        self._revoked = (self._revoked | revoked) - restored
        self._changed = True

    async def fetch(self) -> frozenset[str] | None:
        changed, self._changed = self._changed, False
        return frozenset(self._revoked) if changed else None


# The list is a set; a counter changes with it, so a fetch that finds the same counter costs
# one small reply, however long the list.
_PUBLISH = """
if #ARGV > 0 then
  for i = 1, #ARGV do
    if string.sub(ARGV[i], 1, 1) == '+' then
      redis.call('SADD', KEYS[1], string.sub(ARGV[i], 2))
    else
      redis.call('SREM', KEYS[1], string.sub(ARGV[i], 2))
    end
  end
  redis.call('INCR', KEYS[2])
end
return 1
"""
_FETCH = """
local version = redis.call('GET', KEYS[2]) or '0'
if version == ARGV[1] then
  return {version}
end
return {version, redis.call('SMEMBERS', KEYS[1])}
"""


class RedisRevocations:
    """The list in the shared store."""

    KEYS = (PREFIX + "revoked_keys", PREFIX + "revoked_keys:version")

    def __init__(self, store: Store) -> None:
        self.store = store
        self._publish = store.script(_PUBLISH)
        self._fetch = store.script(_FETCH)
        self._version = b""

    async def publish(self, revoked: set[str], restored: set[str]) -> None:
        changes = [f"+{key}" for key in sorted(revoked)] + [f"-{key}" for key in sorted(restored)]
        await self.store.run(self._publish(keys=list(self.KEYS), args=changes))

    async def fetch(self) -> frozenset[str] | None:
        reply = await self.store.run(self._fetch(keys=list(self.KEYS), args=[self._version]))
        self._version = reply[0]
        if len(reply) == 1:
            return None
        return frozenset(member.decode() for member in reply[1])


class KeyReloader:
    """Keeps :class:`ApiKeys` current: its file's changes, SIGHUP, the shared list of revoked keys."""

    def __init__(self, keys: ApiKeys, source: KeysSource, revocations: Revocations) -> None:
        self.keys = keys
        self.source = source
        self.revocations = revocations
        self.reload_now = asyncio.Event()
        self._stamp = self._file_stamp()
        # Changes not published yet (the store was down): published on a later round.
        self._revoked: set[str] = set()
        self._restored: set[str] = set()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if not self.source.path:
            return None
        try:
            stat = os.stat(self.source.path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def reload(self) -> None:
        """Read the keys again; on an error keep them as they are."""
        try:
            specs = self.source.read()
        except (OSError, ValueError) as error:
            log.error("keys file %s not reloaded, the keys stay as they were: %s", self.source.path, error)
            return
        removed, added = self.keys.load(specs)
        self.keys.revoked -= added  # back in this file: it works here at once
        self._revoked = (self._revoked | removed) - added
        self._restored = (self._restored | added) - removed
        log.info("keys file reloaded: %d keys, %d removed, %d added", len(specs), len(removed), len(added))

    async def step(self) -> None:
        """One round: the file (if it changed or SIGHUP came), then the shared list."""
        stamp = self._file_stamp()
        if self.reload_now.is_set() or stamp != self._stamp:
            self.reload_now.clear()
            self._stamp = stamp
            self.reload()
        with contextlib.suppress(StoreUnavailable):  # the store says it was down; the next round tries again
            if self._revoked or self._restored:
                await self.revocations.publish(self._revoked, self._restored)
                self._revoked, self._restored = set(), set()
            revoked = await self.revocations.fetch()
            if revoked is not None:
                self.keys.revoked = revoked
                if revoked:
                    log.info("%d keys revoked across the replicas", len(revoked))

    async def run(self) -> None:
        """Until cancelled; SIGHUP reloads at once (where this process may take it)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.reload_now.set)
        try:
            while True:
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.reload_now.wait(), POLL_INTERVAL)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
