"""Stored responses: put, get and delete by id, each visible to the key that made it only.

An LRU in this bridge process, bounded by count and bytes, lost on restart (see
the package's docstring for why it lives here).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from common.authorization import parse_authorization


def owner_of(authorization: str | None) -> bytes:
    """Whose a stored response is: a digest of the caller's key."""
    return hashlib.sha256(parse_authorization(authorization)[1].encode()).digest()


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    # The whole conversation as chat messages, this response's output included.
    history: list[dict[str, Any]]
    # This request's own input, as Responses items with ids (for input_items).
    input_items: list[dict[str, Any]]


@dataclass(frozen=True)
class _Entry:
    owner: bytes
    stored: Stored
    size: int


class ResponseStore:
    """An LRU of responses, bounded by count and by (JSON) bytes."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self,
        owner: bytes,
        response: dict[str, Any],
        history: list[dict[str, Any]],
        input_items: list[dict[str, Any]] | None = None,
    ) -> None:
        items = input_items or []
        size = len(orjson.dumps(response)) + len(orjson.dumps(history)) + len(orjson.dumps(items))
        if self.max_count <= 0 or size > self.max_bytes:
            return  # larger than the whole store: not kept (a later lookup is a 404)
        self._drop(response["id"])
        self._entries[response["id"]] = _Entry(owner, Stored(response, history, items), size)
        self.bytes += size
        while len(self._entries) > self.max_count or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def get(self, response_id: str, owner: bytes) -> Stored | None:
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            return None  # another key's response is as absent as a missing one
        self._entries.move_to_end(response_id)
        return entry.stored

    def delete(self, response_id: str, owner: bytes) -> bool:
        if self.get(response_id, owner) is None:
            return False
        self._drop(response_id)
        return True

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
