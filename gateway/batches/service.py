"""BatchService: thin gRPC handlers over the store and the runner.

Every object belongs to the caller's key (its id, the key's digest):
another key's file or batch is NOT_FOUND, as an unknown one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

from common import errors
from gateway.auth import current_key
from gateway.batches.runner import ENDPOINTS, WINDOWS, BatchRunner
from gateway.batches.storage import TIMESTAMPS, Row
from tokenwire.v1 import batch_pb2, batch_pb2_grpc

PURPOSES = ("batch",)
# A file's content is sent in messages of this size, far below any --max-send-message-length.
CONTENT_CHUNK = 32 * 1024


def _owner() -> str:
    """The caller's key id (its digest; "anonymous" when the API is open)."""
    key = current_key.get()
    return key.id if key is not None else "anonymous"


def _file(row: Row) -> batch_pb2.File:
    return batch_pb2.File(
        id=row["id"],
        object="file",
        bytes=row["bytes"],
        created_at=row["created_at"],
        filename=row["filename"],
        purpose=row["purpose"],
        status="processed",
    )


def _limit(value: int | None, default: int, largest: int) -> int:
    if value is None:
        return default
    if not 1 <= value <= largest:
        raise errors.invalid_request(f"'limit' must be between 1 and {largest}.", "limit")
    return value


class BatchServicer(batch_pb2_grpc.BatchServiceServicer):
    def __init__(self, runner: BatchRunner) -> None:
        self.runner = runner
        self.store = runner.store

    def _batch(self, row: Row) -> batch_pb2.Batch:
        counts = self.store.counts(row["id"])
        batch = batch_pb2.Batch(
            id=row["id"],
            object="batch",
            endpoint=row["endpoint"],
            input_file_id=row["input_file_id"],
            completion_window=row["completion_window"],
            status=row["status"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            request_counts=batch_pb2.BatchRequestCounts(
                total=row["total"], completed=counts["completed"], failed=counts["failed"]
            ),
            metadata=json.loads(row["metadata"]),
        )
        for column in ("output_file_id", "error_file_id", *TIMESTAMPS):
            if row[column] is not None:
                setattr(batch, column, row[column])
        if row["errors"]:
            batch.errors.object = "list"
            for problem in json.loads(row["errors"]):
                error = batch.errors.data.add(code=problem["code"], message=problem["message"])
                if problem.get("param"):
                    error.param = problem["param"]
                if problem.get("line"):
                    error.line = problem["line"]
        return batch

    async def CreateFile(
        self, request: batch_pb2.CreateFileRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.CreateFileResponse:
        if request.purpose not in PURPOSES:
            raise errors.invalid_request("'purpose' must be 'batch'.", "purpose")
        limit = self.runner.limits.max_file_bytes
        if len(request.content) > limit:
            raise errors.ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The file is {len(request.content)} bytes; at most {limit} are accepted.",
                param="file",
                code="file_too_large",
            )
        filename = request.filename or "upload.jsonl"
        row = self.store.add_file(_owner(), filename, request.purpose, request.content)
        return batch_pb2.CreateFileResponse(file=_file(row))

    async def ListFiles(
        self, request: batch_pb2.ListFilesRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.ListFilesResponse:
        limit = _limit(request.limit if request.HasField("limit") else None, 10_000, 10_000)
        rows, more = self.store.files(_owner(), request.purpose, limit, request.after)
        return batch_pb2.ListFilesResponse(data=[_file(r) for r in rows], has_more=more)

    async def GetFile(
        self, request: batch_pb2.GetFileRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.GetFileResponse:
        return batch_pb2.GetFileResponse(file=_file(self.store.file(_owner(), request.file_id)))

    async def GetFileContent(
        self, request: batch_pb2.GetFileContentRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.GetFileContentResponse:
        return batch_pb2.GetFileContentResponse(content=self.store.content(_owner(), request.file_id))

    async def ReadFileContent(
        self, request: batch_pb2.ReadFileContentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[batch_pb2.ReadFileContentResponse]:
        with self.store.open_content(_owner(), request.file_id) as content:
            while chunk := content.read(CONTENT_CHUNK):  # a local file: no wait worth a thread
                yield batch_pb2.ReadFileContentResponse(chunk=chunk)

    async def DeleteFile(
        self, request: batch_pb2.DeleteFileRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.DeleteFileResponse:
        self.store.delete_file(_owner(), request.file_id)
        return batch_pb2.DeleteFileResponse(id=request.file_id, object="file", deleted=True)

    async def CreateBatch(
        self, request: batch_pb2.CreateBatchRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.CreateBatchResponse:
        if request.endpoint not in ENDPOINTS:
            raise errors.invalid_request(f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", "endpoint")
        if request.completion_window not in WINDOWS:
            raise errors.invalid_request("'completion_window' must be '24h'.", "completion_window")
        if len(request.metadata) > 16:
            raise errors.invalid_request("'metadata' holds at most 16 pairs.", "metadata")
        owner = _owner()
        try:
            source = self.store.file(owner, request.input_file_id)
        except errors.ApiError:
            raise errors.invalid_request(
                f"No such File object: {request.input_file_id}", "input_file_id", "invalid_file"
            ) from None
        if source["purpose"] != "batch":
            raise errors.invalid_request("The input file's purpose must be 'batch'.", "input_file_id")
        window = self.runner.limits.window_seconds
        row = self.store.add_batch(owner, request.endpoint, request.input_file_id, window, dict(request.metadata))
        self.runner.wake()
        return batch_pb2.CreateBatchResponse(batch=self._batch(row))

    async def GetBatch(
        self, request: batch_pb2.GetBatchRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.GetBatchResponse:
        return batch_pb2.GetBatchResponse(batch=self._batch(self.store.batch(_owner(), request.batch_id)))

    async def ListBatches(
        self, request: batch_pb2.ListBatchesRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.ListBatchesResponse:
        limit = _limit(request.limit if request.HasField("limit") else None, 20, 100)
        rows, more = self.store.batches(_owner(), limit, request.after)
        return batch_pb2.ListBatchesResponse(data=[self._batch(r) for r in rows], has_more=more)

    async def CancelBatch(
        self, request: batch_pb2.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.CancelBatchResponse:
        owner = _owner()
        row = self.store.batch(owner, request.batch_id)
        if row["status"] in ("validating", "in_progress"):
            self.store.set_status(row["id"], "cancelling")
            self.runner.cancel(row["id"])
        elif row["status"] not in ("cancelling", "cancelled"):
            raise errors.ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Cannot cancel a batch with status '{row['status']}'.",
                param="batch_id",
            )
        return batch_pb2.CancelBatchResponse(batch=self._batch(self.store.batch(owner, request.batch_id)))
