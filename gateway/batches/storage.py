"""What the batch API and runner need of a store: :class:`BatchStorage`, with two implementations.

:class:`gateway.batches.store.BatchStore` (SQLite and a files directory under ``--data-dir``, the
default: nothing to set up) and :class:`gateway.batches.redis_store.RedisBatchStore` (the
replicas' shared store, ``--store redis://...``: any front end serves any batch). A row is a
mapping of column names (``row["status"]``) in both; an absent column is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import grpc

from common import errors

# A batch's lifecycle, as OpenAI's: validating -> in_progress -> finalizing -> completed,
# or failed (validation), cancelling -> cancelled, expired.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def not_found(kind: str, object_id: str) -> errors.ApiError:
    """Unknown, deleted, or another key's: the same answer (OpenAI's wording)."""
    return errors.ApiError(grpc.StatusCode.NOT_FOUND, f"No such {kind} object: {object_id}", param="id")


@dataclass(frozen=True)
class Request:
    batch_id: str
    line: int
    custom_id: str
    body: dict[str, Any]


# sqlite3.Row or a dict: both read as row["column"].
Row = Any


def store_down(error: errors.ApiError) -> bool:
    """The store did not answer (503 store_unavailable): nothing was decided, try again later."""
    return error.code == "store_unavailable"


class BatchStorage(Protocol):
    def close(self) -> None: ...

    def claim(self) -> bool:
        """Whether this process runs the batches now (one runner at a time); asked at each pass."""
        ...

    def add_file(self, owner: str, filename: str, purpose: str, content: bytes, file_id: str | None = None) -> Row: ...
    def file(self, owner: str, file_id: str) -> Row: ...
    def files(self, owner: str, purpose: str, limit: int, after: str) -> tuple[list[Row], bool]: ...
    def content(self, owner: str, file_id: str) -> bytes: ...
    def open_content(self, owner: str, file_id: str) -> BinaryIO: ...
    def delete_file(self, owner: str, file_id: str) -> None: ...

    def add_batch(
        self, owner: str, endpoint: str, input_file_id: str, window_seconds: int, metadata: dict[str, str]
    ) -> Row: ...
    def batch(self, owner: str | None, batch_id: str) -> Row: ...
    def batches(self, owner: str, limit: int, after: str) -> tuple[list[Row], bool]: ...
    def active(self) -> list[Row]: ...
    def set_status(self, batch_id: str, status: str, **fields: Any) -> None: ...
    def start(self, batch_id: str, requests: list[tuple[int, str, str]]) -> None: ...
    def fail(self, batch_id: str, problems: list[dict[str, Any]]) -> None: ...
    def pending(self, batch_id: str, limit: int, skip: set[str]) -> list[Request]: ...
    def commit(self, request: Request, ok: bool, result: str) -> bool: ...
    def counts(self, batch_id: str) -> dict[str, int]: ...
    def results(self, batch_id: str, state: str) -> list[str]: ...
